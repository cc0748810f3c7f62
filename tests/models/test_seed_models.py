"""FCN-32s/16s/8s, U-Net and SegNet through the shared tester."""

from tests.models.base import ModelTester

SMALL_FCN = {"base_channels": 4, "fc_channels": 16}


class TestFCN32s(ModelTester):
    arch = "fcn32s"
    params = SMALL_FCN


class TestFCN16s(ModelTester):
    arch = "fcn16s"
    params = SMALL_FCN


class TestFCN8s(ModelTester):
    arch = "fcn8s"
    params = {**SMALL_FCN, "batch_norm": True}


class TestUNet(ModelTester):
    arch = "unet"
    params = {"base_channels": 4, "depth": 4, "dropout": 0.2}


class TestUNetGray(ModelTester):
    arch = "unet"
    in_channels = 1
    num_classes = 2
    params = {"base_channels": 4, "depth": 2}


class TestUNetBedOfNails(ModelTester):
    arch = "unet"
    params = {"base_channels": 4, "depth": 3, "upsample": "bed_of_nails"}


class TestUNetMaxUnpool(ModelTester):
    arch = "unet"
    in_channels = 1
    num_classes = 2
    params = {"base_channels": 4, "depth": 3, "upsample": "max_unpool"}


class TestFCN8sBilinear(ModelTester):
    arch = "fcn8s"
    params = {**SMALL_FCN, "upsample": "bilinear"}


class TestSegNetVGG16(ModelTester):
    arch = "segnet"
    params = {"variant": "vgg16", "base_channels": 4}


class TestSegNetBasic(ModelTester):
    arch = "segnet"
    params = {"variant": "basic", "base_channels": 8}
