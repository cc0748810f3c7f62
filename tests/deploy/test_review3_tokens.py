"""Management needs more privilege than inference: the server's tokens file stays with the server.

The server's ``--token-file`` lists every token with its scopes, the ``manage`` one included (LoadModel,
UnloadModel, SetDefaultVersion, datasets, training). A client given that same file sends its first
token, whatever its scopes, and holds every other token besides. So the documented client commands use
a file of their own (the inference token alone), and in the manifests only the server mounts the
tokens Secret.
"""

from __future__ import annotations

import re
import shlex

import pytest

from tests.deploy.conftest import DEPLOY
from tests.deploy.k8s_objects import Obj, containers, load_all, pod_specs

README = (DEPLOY / "README.md").read_text()


def _bash_commands(text: str) -> list[list[str]]:
    """The words of each command of the ```bash blocks (continuation lines joined, comments dropped, split at
    ``&&``, ``||``, ``|``, ``;`` and ``&``)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words: list[str] = []
            for word in shlex.split(line, comments=True):
                if word in ("&&", "||", "|", ";", "&"):
                    commands.append(words)
                    words = []
                else:
                    words.append(word)
            commands.append(words)
    return [c for c in commands if c]


def _path(text: str) -> str:
    return text.removeprefix("./")


def _server_token_files(text: str) -> set[str]:
    """The files the README makes the servers' tokens from: the Kubernetes Secret and the Compose secret."""
    files = {_path(f) for f in re.findall(r"create secret generic segsvc-tokens\s+--from-file=tokens=(\S+)", text)}
    files |= {_path(f) for f in re.findall(r"secrets: \{tokens: \{file: (\S+?)\}\}", text)}
    return files


def _client_token_files(text: str) -> list[tuple[str, str]]:
    """(command, token file) of every documented ``segsvc`` client command (anything but ``serve``)."""
    found = []
    for words in _bash_commands(text):
        for i, word in enumerate(words[:-1]):
            if word.rsplit("/", 1)[-1] == "segsvc" and words[i + 1] != "serve" and "--token-file" in words:
                found.append((" ".join(words), _path(words[words.index("--token-file") + 1])))
                break
    return found


def test_readme_names_the_servers_tokens_file() -> None:
    assert _server_token_files(README), "deploy/README.md says which file the server's tokens come from"


def test_documented_clients_do_not_get_the_servers_tokens_file() -> None:
    server_files = _server_token_files(README)
    clients = _client_token_files(README)
    assert clients, "deploy/README.md shows a client with a token (the cluster route)"
    given = [(command, f) for command, f in clients if f in server_files]
    assert not given, f"clients given the server's tokens file {server_files} (every token, manage included): {given}"


def test_the_check_finds_a_client_given_the_servers_file() -> None:
    text = ("```bash\nkubectl -n segsvc create secret generic segsvc-tokens --from-file=tokens=./all.txt\n"
            "kubectl -n segsvc port-forward svc/segsvc 50051:50051 &\n"
            ".venv/bin/segsvc segment a/ --server localhost:50051 --token-file all.txt --out o   # a comment\n```")
    assert _server_token_files(text) == {"all.txt"}
    assert _client_token_files(text) == [(".venv/bin/segsvc segment a/ --server localhost:50051 --token-file all.txt "
                                          "--out o", "all.txt")]


@pytest.fixture(scope="module")
def objects() -> list[Obj]:
    return load_all()


def test_only_servers_mount_the_tokens_secret(objects: list[Obj]) -> None:
    """A batch, training or shell pod that mounted segsvc-tokens would hold the manage token for nothing."""
    mounted = []
    for obj in objects:  # a ServingRuntime's containers and volumes included (pod_specs)
        for where, pod in pod_specs(obj.doc):
            secret_volumes = {v["name"] for v in pod.get("volumes", ())
                              if v.get("secret", {}).get("secretName") == "segsvc-tokens"}
            for c in containers(pod):
                if any(m["name"] in secret_volumes for m in c.get("volumeMounts", ())):
                    mounted.append((str(obj), c.get("args", [None])[0]))
    assert mounted, "the servers mount the tokens Secret"
    assert {args0 for _, args0 in mounted} == {"serve"}, mounted
