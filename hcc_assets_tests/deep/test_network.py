import hashlib

import pytest


@pytest.fixture(scope="module", autouse=True)
def _import_torch_and_monai():
    """torch and MONAI take seconds to import: they load when these tests run, not when each
    pytest-xdist worker collects this module (the unit tier's start-up)."""
    global torch, SEEDED_RANDOM_INIT, CheckpointMismatchError, build_classifier, load_medicalnet_checkpoint
    import torch

    from hcc_assets.deep import (
        SEEDED_RANDOM_INIT,
        CheckpointMismatchError,
        build_classifier,
        load_medicalnet_checkpoint,
    )


def write_medicalnet_file(model, path, edit=None):
    """A MedicalNet-style file from the trunk's own names and shapes, with random values."""
    generator = torch.Generator().manual_seed(7)
    weights = {
        name: torch.rand(value.shape, generator=generator) if value.is_floating_point() else value.clone()
        for name, value in model.trunk.state_dict().items()
    }
    weights["conv_seg.0.weight"] = torch.rand(2, 2, 2, 2, 2)  # MedicalNet's segmentation decoder
    if edit:
        edit(weights)
    torch.save({"state_dict": {f"module.{name}": value for name, value in weights.items()}}, path)
    return weights


@pytest.fixture(scope="module")
def depth50():
    return build_classifier(depth=50, seed=3)


def test_depth50_is_medicalnet_layout_with_study_head(depth50):
    trunk = depth50.trunk
    assert trunk.conv1.stride == (2, 2, 2) and trunk.conv1.kernel_size == (7, 7, 7)  # not in the keys: pinned
    assert trunk.conv1.in_channels == 1 and trunk.fc is None
    shortcut = trunk.layer1[0].downsample  # shortcut "B" without bias, as MedicalNet's resnet50
    assert isinstance(shortcut, torch.nn.Sequential) and shortcut[0].bias is None
    head = (depth50.embedding.in_features, depth50.embedding.out_features, depth50.output.out_features)
    assert head == (2048, 128, 1)
    assert depth50.init_description == SEEDED_RANDOM_INIT
    trainable = {id(p) for p in depth50.trainable_parameters()}
    for name, parameter in depth50.named_parameters():
        is_trained = name.startswith(("trunk.layer4.", "embedding.", "output."))
        assert parameter.requires_grad == is_trained == (id(parameter) in trainable), name


def test_depth50_loads_medicalnet_file_strictly(depth50, tmp_path):
    path = tmp_path / "resnet_50_23dataset.pth"
    written = write_medicalnet_file(depth50, path)
    head_before = depth50.embedding.weight.clone()

    init = load_medicalnet_checkpoint(depth50, path)

    assert init == depth50.init_description == "medicalnet:" + hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = depth50.trunk.state_dict()
    assert set(loaded) == set(written) - {"conv_seg.0.weight"}
    assert all(torch.equal(loaded[name], written[name]) for name in loaded)
    assert torch.equal(depth50.embedding.weight, head_before)  # the new head is not in the file


def test_seeded_initialization_is_reproducible():
    first, second, other = (build_classifier(depth=10, seed=s) for s in (5, 5, 6))
    assert torch.equal(first.embedding.weight, second.embedding.weight)
    assert torch.equal(first.trunk.layer4[0].conv1.weight, second.trunk.layer4[0].conv1.weight)
    assert not torch.equal(first.embedding.weight, other.embedding.weight)


def drop(*names):
    return lambda weights: [weights.pop(name) for name in names]


@pytest.mark.parametrize(
    "edit, message",
    [
        (drop("layer2.0.conv1.weight"), "missing trunk keys (1): layer2.0.conv1.weight"),
        (lambda w: w.update({"fc.weight": torch.zeros(1, 512)}), "unexpected keys (1): fc.weight"),
        (lambda w: w.update({"layer3.0.bn1.weight": torch.zeros(7)}), "layer3.0.bn1.weight file (7,) vs model (256,)"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_loader_refuses_files_that_do_not_fit(tmp_path, edit, message):
    model = build_classifier(depth=10)
    write_medicalnet_file(model, tmp_path / "m.pth", edit)
    with pytest.raises(CheckpointMismatchError) as raised:
        load_medicalnet_checkpoint(model, tmp_path / "m.pth")
    assert message in str(raised.value)
    assert model.init_description == SEEDED_RANDOM_INIT


def test_loader_lists_a_limited_number_of_keys_for_a_wrong_depth(tmp_path):
    write_medicalnet_file(build_classifier(depth=10), tmp_path / "resnet_10.pth")
    with pytest.raises(CheckpointMismatchError, match=r"depth-18.*missing trunk keys.*\.\.\. and \d+ more"):
        load_medicalnet_checkpoint(build_classifier(depth=18), tmp_path / "resnet_10.pth", max_listed=3)


def test_loader_tolerates_missing_batchnorm_counters(tmp_path):
    model = build_classifier(depth=10)
    counters = [name for name in model.trunk.state_dict() if name.endswith("num_batches_tracked")]
    written = write_medicalnet_file(model, tmp_path / "old.pth", drop(*counters))
    load_medicalnet_checkpoint(model, tmp_path / "old.pth")
    assert torch.equal(model.trunk.layer1[0].conv1.weight, written["layer1.0.conv1.weight"])


def test_medicalnet_layout_keeps_weights_but_dilates_layer3_and_layer4():
    monai, medicalnet = build_classifier(depth=18, layout="monai"), build_classifier(depth=18, layout="medicalnet")
    shapes = lambda model: {k: v.shape for k, v in model.state_dict().items()}  # noqa: E731
    assert shapes(monai) == shapes(medicalnet)
    dilated = medicalnet.trunk.layer4[0].conv1
    assert dilated.dilation == (4, 4, 4) and dilated.stride == (1, 1, 1)
    with torch.no_grad():
        volumes = torch.zeros(1, 1, 32, 32, 16)
        assert medicalnet.eval().trunk.layer4(medicalnet.frozen_features(volumes)).shape[2:] == (4, 4, 2)
        assert monai.eval().trunk.layer4(monai.frozen_features(volumes)).shape[2:] == (1, 1, 1)


def test_frozen_part_stays_in_eval_mode_when_training():
    model = build_classifier(depth=10).train()
    assert not any(module.training for module in model.frozen_modules())
    assert model.trunk.layer4.training and model.embedding.training
    running_mean = model.trunk.bn1.running_mean.clone()
    model(torch.randn(2, 1, 32, 32, 16))
    assert torch.equal(model.trunk.bn1.running_mean, running_mean)
