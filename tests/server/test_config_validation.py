"""Configurations built in Python refuse what the command line refuses, each naming the field.

NaN passes every ``value < 0`` check and infinity every lower bound, so ``ManagerConfig`` and ``ServerConfig``
took them when built in Python (only the CLI refused them, by flag): they then broke the stop's deadlines, or
the start (``round`` of infinity, gRPC's 32-bit options) with a traceback. The limits are counts and sizes:
a float there (NaN included) passed ``< 1`` as well.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from segsvc.errors import InvalidArgument
from segsvc.inference.manager import ManagerConfig
from segsvc.server.app import grpc_options
from segsvc.server.config import LimitsConfig, ServerConfig

NOT_FINITE = [math.nan, math.inf, -math.inf]
GRPC_MAX_S = (2**31 - 1) // 1000  # gRPC takes the connection age and its grace as a 32-bit count of milliseconds
LIMITS = ["max_message_bytes", "max_pixels", "max_stream_in_flight", "max_inflight_mb", "max_tiles",
          "max_work_pixels", "max_concurrent_rpcs"]


@pytest.mark.parametrize("value", NOT_FINITE)
@pytest.mark.parametrize("name", ["poll_interval_s", "drain_timeout_s"])
def test_manager_durations_that_are_not_finite_are_refused_by_field(name: str, value: float) -> None:
    with pytest.raises(InvalidArgument, match=f"^{name} must be a finite number of seconds"):
        ManagerConfig(**{name: value})


def test_manager_durations_keep_their_ranges() -> None:
    assert ManagerConfig(poll_interval_s=0.0, drain_timeout_s=0.5).drain_timeout_s == 0.5
    with pytest.raises(InvalidArgument, match="^drain_timeout_s must be a finite number of seconds > 0, got 0"):
        ManagerConfig(drain_timeout_s=0.0)
    with pytest.raises(InvalidArgument, match="^poll_interval_s must be a finite number of seconds >= 0, got -1"):
        ManagerConfig(poll_interval_s=-1.0)


@pytest.mark.parametrize("value", NOT_FINITE)
@pytest.mark.parametrize("name", ["grace_s", "max_connection_age_s"])
def test_server_durations_that_are_not_finite_are_refused_by_field(name: str, value: float) -> None:
    with pytest.raises(InvalidArgument, match=f"^{name} must be a finite number of seconds"):
        ServerConfig(model_repo=Path("repo"), **{name: value})


@pytest.mark.parametrize("name", ["grace_s", "max_connection_age_s"])
def test_server_durations_beyond_what_grpc_holds_are_refused_by_field(name: str) -> None:
    """Both go to gRPC in milliseconds (with a connection age): 30 days failed the start with an OverflowError."""
    longest = ServerConfig(model_repo=Path("repo"), grace_s=GRPC_MAX_S, max_connection_age_s=GRPC_MAX_S)
    assert all(value <= 2**31 - 1 for _, value in grpc_options(longest))
    with pytest.raises(InvalidArgument, match=f"^{name} must be at most {GRPC_MAX_S} s"):
        ServerConfig(model_repo=Path("repo"), **{name: GRPC_MAX_S + 1.0})


@pytest.mark.parametrize("value", [math.nan, math.inf, 2.5, 0, -1])
@pytest.mark.parametrize("name", LIMITS)
def test_limits_that_are_not_positive_whole_numbers_are_refused_by_field(name: str, value: float) -> None:
    with pytest.raises(InvalidArgument, match=f"^{name} must be a positive whole number"):
        LimitsConfig(**{name: value})


def test_a_message_limit_beyond_what_grpc_holds_is_refused() -> None:
    """gRPC takes the message limits as a 32-bit int: 2 GiB and more failed the start with a traceback."""
    assert LimitsConfig(max_message_bytes=2**31 - 1).max_message_bytes == 2**31 - 1
    with pytest.raises(InvalidArgument, match="^max_message_bytes must be at most 2147483647"):
        LimitsConfig(max_message_bytes=2**31)


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1", "0.0000001", "2048"])
def test_a_message_limit_that_is_not_a_size_grpc_holds_is_refused_by_flag(serve_config, capsys, value: str) -> None:
    """``int(nan * MIB)`` raised ValueError, infinity OverflowError: a traceback instead of the flag's name."""
    status, config = serve_config("--max-message-mb", value)
    err = capsys.readouterr().err
    assert status == 2 and config is None, err
    assert "segsvc: error: --max-message-mb must be" in err and "Traceback" not in err, err


def test_a_message_limit_flag_reaches_the_limits(serve_config) -> None:
    status, config = serve_config("--max-message-mb", "0.5")
    assert status == 0 and config.limits.max_message_bytes == 512 * 1024
