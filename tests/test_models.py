"""Tests for spinedxa.models: registry, forward/backward of every model on ROI-shaped inputs (H x H/2) at its configured
and smallest sizes, VGG BatchNorm variants, ResNet-50's zero-initialised residuals, the builder arguments (weights,
transform_input), cnn21's layer count, load_trained and predict_proba, and a "can it fit" check of every model on a
handful of images. Loading pre-trained weights: tests/test_weights.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from spinedxa.config import MODEL_NAMES, load_params
from spinedxa.data import input_shape
from spinedxa.models import (
    ImageNetInput,
    from_state,
    get_model,
    get_spec,
    list_models,
    load_trained,
    predict_proba,
    variant,
)
from spinedxa.recipe import AUX_LOSS_WEIGHT, build_optimizer
from spinedxa.models.cnn21 import CNN21, count_layers, matlab_layers

REPO = Path(__file__).resolve().parents[1]
PARAMS = load_params(REPO / "params.yaml")
# Each model's smallest allowed image_size: its narrow side (image_size / 2) at the model's min_size.
SMALLEST = {name: 2 * get_spec(name).min_size for name in MODEL_NAMES}
# ROI-shaped inputs (H x H/2) at the smallest size keep most tests fast.
TEST_SHAPE = {name: input_shape(SMALLEST[name]) for name in MODEL_NAMES}
PRETRAINED = [n for n in MODEL_NAMES if n != "cnn21"]
VGG = ["vgg16", "vgg19"]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def built() -> dict[str, nn.Module]:
    """Each model built once (VGG's 100 M-parameter head takes seconds to initialise)."""
    torch.manual_seed(0)
    return {name: get_model(name, 2) for name in MODEL_NAMES}


def test_registry_lists_config_models() -> None:
    assert list_models() == list(MODEL_NAMES)
    assert {get_spec(n).name for n in MODEL_NAMES} == set(MODEL_NAMES)


@pytest.mark.parametrize(
    ("name", "input_size", "min_size"),
    [("cnn21", 224, 32), ("resnet50", 224, 32), ("vgg16", 224, 32), ("vgg19", 224, 32), ("inception_v3", 299, 75)],
)
def test_spec_sizes(name: str, input_size: int, min_size: int) -> None:
    spec = get_spec(name)
    assert (spec.input_size, spec.min_size) == (input_size, min_size)


def _configured(name: str) -> tuple[nn.Module, tuple[int, int]]:
    """The model as params.yaml trains it (its variant) and its configured input shape."""
    cfg = PARAMS.train.model(name)
    torch.manual_seed(0)
    return get_model(name, 2, batch_norm=cfg.batch_norm), input_shape(cfg.image_size)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward_train_and_eval_at_the_configured_size(name: str) -> None:
    """Each model, as params.yaml configures it, takes the ROI-shaped input (image_size x image_size / 2)."""
    model, shape = _configured(name)
    spec = get_spec(name)
    x = torch.rand(2, 1, *shape)

    model.train()
    logits, aux = spec.unwrap(model(x))
    assert logits.shape == (2, 2)
    if name == "inception_v3":
        assert aux is not None and aux.shape == (2, 2)  # training mode returns InceptionOutputs(logits, aux)
    else:
        assert aux is None
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    if aux is not None:
        loss = loss + 0.4 * nn.functional.cross_entropy(aux, torch.tensor([0, 1]))
    model.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)

    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2)  # eval mode: a plain tensor, even for Inception
    assert spec.unwrap(out)[1] is None


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_smallest_allowed_input_works_in_train_and_eval_mode(built: dict[str, nn.Module], name: str) -> None:
    """The smallest image_size the train stage accepts (narrow side = min_size) runs forward and backward."""
    model, spec = built[name], get_spec(name)
    h, w = TEST_SHAPE[name]
    assert min(h, w) == spec.min_size
    model.train()
    logits, aux = spec.unwrap(model(torch.rand(2, 1, h, w)))
    assert logits.shape == (2, 2)
    logits.sum().backward()
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, h, w)).shape == (1, 2)


@pytest.mark.parametrize("profile", ["params.yaml", *sorted(p.name for p in (REPO / "profiles").glob("*.yaml"))])
def test_every_configured_image_size_is_allowed(profile: str) -> None:
    """params.yaml and every profile give each model inputs at or above its minimum."""
    from spinedxa.config import deep_merge, params_from_dict, read_yaml

    raw = read_yaml(REPO / "params.yaml")
    if profile != "params.yaml":
        raw = deep_merge(raw, read_yaml(REPO / "profiles" / profile) or {})
    params = params_from_dict(raw)
    for name in params.train.models:
        assert min(input_shape(params.train.model(name).image_size)) >= get_spec(name).min_size, (profile, name)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradcam_layer_is_a_submodule_with_spatial_activations(built: dict[str, nn.Module], name: str) -> None:
    model, spec = built[name], get_spec(name)
    layer = spec.gradcam_layer(model)
    assert any(layer is m for m in model.modules())
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    model.eval()
    with torch.no_grad():
        model(torch.rand(1, 1, *TEST_SHAPE[name]))
    handle.remove()
    assert len(seen) == 1 and seen[0].ndim == 4  # a feature map Grad-CAM can weight


def test_gradcam_runs_with_pytorch_grad_cam(built: dict[str, nn.Module]) -> None:
    from pytorch_grad_cam import GradCAM

    model = built["cnn21"].eval()
    with GradCAM(model=model, target_layers=[get_spec("cnn21").gradcam_layer(model)]) as cam:
        heat = cam(input_tensor=torch.rand(2, 1, 64, 32), targets=None)  # None: explain the top class
    assert heat.shape == (2, 64, 32)
    assert np.isfinite(heat).all()


@pytest.mark.parametrize("name", PRETRAINED)
def test_imagenet_wrapper_takes_grayscale_and_keeps_backbone_state_dict(built: dict[str, nn.Module], name: str) -> None:
    model = built[name]
    assert isinstance(model, ImageNetInput)
    assert all(key.startswith("backbone.") for key in model.state_dict())
    with pytest.raises(ValueError, match="N x 1 x H x W"):
        model(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "message"),
    [
        ("alexnet", {}, ValueError, r"unknown model 'alexnet'; expected one of \['cnn21'"),
        ("resnet50", {"weights": "IMAGENET1K_V2"}, ValueError, r"unknown weights 'IMAGENET1K_V2'"),
        ("resnet50", {"weights": True}, ValueError, r"unknown weights True"),
        # get_model never reads a file: pre-trained weights are spinedxa.weights.build_model's (test_weights.py)
        ("resnet50", {"weights": "imagenet"}, ValueError, r"unknown weights 'imagenet'.*spinedxa.weights.build_model"),
        ("resnet50", {"transform_input": True}, ValueError, r"resnet50: transform_input is InceptionV3's"),
        ("vgg16", {"transform_input": True}, ValueError, r"vgg16: transform_input is InceptionV3's"),
    ],
)
def test_invalid_model_or_weights(name: str, kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        get_model(name, 2, **kwargs)


@pytest.mark.parametrize("num_classes", [0, -1, 2.0, True])
def test_invalid_num_classes(num_classes: object) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        get_model("cnn21", num_classes)  # type: ignore[arg-type]


@pytest.mark.parametrize("weights", [None, "none"])
def test_no_weights_values(weights: str | None) -> None:
    assert isinstance(get_model("cnn21", 3, weights=weights), CNN21)


# ------------------------------------------------------------------------------- variants and initialisation


@pytest.mark.parametrize("name", VGG)
def test_vgg_batch_norm_variant(built: dict[str, nn.Module], name: str) -> None:
    plain, bn = built[name], get_model(name, 2, batch_norm=True)
    n_conv = sum(isinstance(m, nn.Conv2d) for m in plain.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == n_conv  # one after every convolution
    assert sum(isinstance(m, nn.Conv2d) for m in bn.modules()) == n_conv
    assert variant(name, True) == f"{name}_bn" and variant(name, False) == variant(name) == name
    layer = get_spec(name).gradcam_layer(bn)
    assert isinstance(layer, nn.ReLU) and any(layer is m for m in bn.backbone.features)


@pytest.mark.parametrize("name", ["cnn21", "resnet50", "inception_v3"])
def test_batch_norm_variant_is_vgg_only(name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name}: batch_norm selects the BatchNorm variant of VGG only"):
        get_model(name, 2, batch_norm=True)
    assert variant(name) == name


@pytest.mark.parametrize("meta, expected", [({"batch_norm": True}, True), ({"batch_norm": False}, False),
                                            ({}, False)])  # meta.json of models trained before the variants existed
def test_load_trained_builds_the_variant_meta_json_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         meta: dict, expected: bool) -> None:
    """load_trained asks the registry for the variant meta.json records (a stand-in network keeps this fast: a
    VGG state dict is 0.5 GB)."""
    import spinedxa.models as models

    asked: list[tuple[str, bool]] = []

    def spy(name: str, num_classes: int, *, weights: str | None = None, batch_norm: bool = False,
            transform_input: bool = False) -> nn.Module:
        asked.append((name, batch_norm))
        torch.manual_seed(0)
        return CNN21(num_classes=num_classes)

    monkeypatch.setattr(models, "get_model", spy)
    _save_trained(tmp_path / "vgg", "vgg16", spy("vgg16", 2), **meta)
    asked.clear()
    load_trained(tmp_path / "vgg")
    assert asked == [("vgg16", expected)]


def test_resnet50_from_scratch_starts_every_residual_branch_at_zero(built: dict[str, nn.Module]) -> None:
    """zero_init_residual (Goyal et al. 2017): the last BatchNorm of each bottleneck starts at 0, so every block
    starts as the identity."""
    from torchvision.models.resnet import Bottleneck

    blocks = [m for m in built["resnet50"].modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16
    with torch.no_grad():
        assert all(float(b.bn3.weight.abs().max()) == 0.0 for b in blocks)
        assert all(float(b.bn2.weight.abs().min()) > 0.0 for b in blocks)  # only the last one of each branch


@pytest.mark.parametrize("transform_input", [False, True])
def test_inception_transform_input_is_built_and_rebuilt_by_load_trained(tmp_path: Path, transform_input: bool) -> None:
    """transform_input is no tensor of the state dict: load_trained rebuilds it from meta.json, so the evaluated model
    sees its input as the trained one did (torchvision's ImageNet InceptionV3 needs it on)."""
    model = get_model("inception_v3", 2, transform_input=transform_input)
    assert model.backbone.transform_input is transform_input
    _save_trained(tmp_path / "inc", "inception_v3", model, transform_input=transform_input)
    loaded, _ = load_trained(tmp_path / "inc")
    assert loaded.backbone.transform_input is transform_input
    x = torch.rand(1, 1, *TEST_SHAPE["inception_v3"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


# ------------------------------------------------------------------------------------------ can it fit


def _handful(shape: tuple[int, int], n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` ROI-shaped images, half of each class: osteoporosis has a darker, noisier central band."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = 0.15 + 0.05 * torch.rand(n, 1, *shape, generator=g)
    band = slice(int(0.3 * shape[1]), int(0.7 * shape[1]))
    x[:, :, :, band] = torch.where(y[:, None, None, None] == 1, 0.45, 0.75) + \
        0.1 * y[:, None, None, None] * torch.rand(n, 1, shape[0], band.stop - band.start, generator=g)
    return x.clamp(0, 1), y


#: Steps of the fit check; the big torchvision networks cost ~0.3-1.3 s a step each on one shared CPU thread.
FIT_STEPS = 20


@pytest.mark.parametrize("name", [
    "cnn21", "resnet50", "inception_v3",
    # VGG's 100 M-parameter classifier makes each step ~1.3 s on one CPU thread (measured, AMD EPYC under load).
    pytest.param("vgg16", marks=pytest.mark.slow), pytest.param("vgg19", marks=pytest.mark.slow),
])
def test_each_model_can_fit_a_handful_of_images(name: str) -> None:
    """Issue 8's "can it fit" check: with its params.yaml recipe (optimizer, lr, weight decay, variant) and at its
    smallest allowed input, each network drives the training loss on four images well down within 20 steps."""
    cfg, spec = PARAMS.train.model(name), get_spec(name)
    torch.manual_seed(0)
    model = get_model(name, 2, batch_norm=cfg.batch_norm).train()
    x, y = _handful(TEST_SHAPE[name])
    optimizer = build_optimizer(model.parameters(), cfg, fused=True)
    losses = []
    for _ in range(FIT_STEPS):
        logits, aux = spec.unwrap(model(x))
        loss = nn.functional.cross_entropy(logits, y)
        if aux is not None:
            loss = loss + AUX_LOSS_WEIGHT * nn.functional.cross_entropy(aux, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)), losses
    assert np.mean(losses[-5:]) < 0.5 * losses[0], [round(v, 3) for v in losses]
    with torch.no_grad():
        assert torch.equal(spec.unwrap(model(x))[0].argmax(dim=1), y)  # the four images are fitted


# ------------------------------------------------------------------------------------------------- cnn21


def test_cnn21_has_21_layers_by_matlab_counting() -> None:
    model = CNN21()
    assert count_layers(model) == 21
    leaves = [m for m in model.modules() if not list(m.children())]
    assert len(leaves) == 19  # layers 1-19 are modules; softmax and classification live in the loss


def test_cnn21_layer_table_in_docs_matches_model() -> None:
    """docs/cnn21.md and the module docstring list the layers of the built model, in order."""
    import spinedxa.models.cnn21 as cnn21_module

    built_names = matlab_layers(CNN21())
    doc_rows = re.findall(r"^\|\s*(\d+)\s*\|\s*(\w+)\s*\|", (REPO / "docs" / "cnn21.md").read_text(), flags=re.M)
    assert [int(i) for i, _ in doc_rows] == list(range(1, 22))
    assert [name for _, name in doc_rows] == built_names
    docstring_rows = re.findall(r"^ (\d+)\s+([a-zA-Z0-9]+)", cnn21_module.__doc__, flags=re.M)
    assert [name.rstrip("(") for _, name in docstring_rows] == built_names


def test_cnn21_size_is_cpu_friendly() -> None:
    n_params = sum(p.numel() for p in CNN21().parameters())
    assert 2e5 < n_params < 5e6


@pytest.mark.parametrize("size", [32, 64, 128, 299])
def test_cnn21_accepts_sizes(size: int) -> None:
    model = CNN21().eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, size, size)).shape == (1, 2)


@pytest.mark.parametrize(
    ("shape", "message"),
    [((1, 3, 64, 64), r"expected input N x 1 x H x W"), ((1, 1, 16, 64), r"smaller than the minimum 32"),
     ((1, 64, 64), r"got shape \(1, 64, 64\)")],
)
def test_cnn21_rejects_bad_input(shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CNN21()(torch.rand(*shape))


# ------------------------------------------------------------------------------------ load_trained / predict


def _save_trained(model_dir: Path, name: str, model: nn.Module, **meta_overrides: object) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), model_dir / "model.pt")
    meta = {"model": name, "image_size": 64, "classes": ["normal", "osteoporosis"]} | meta_overrides
    (model_dir / "meta.json").write_text(json.dumps(meta))


def test_load_trained_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = get_model("cnn21", 2)
    # Non-default batch-norm statistics prove buffers travel too.
    model.train()
    model(torch.rand(4, 1, 64, 64))
    _save_trained(tmp_path / "cnn21", "cnn21", model)

    loaded, meta = load_trained(tmp_path / "cnn21")
    assert meta["image_size"] == 64 and not loaded.training
    images = torch.rand(5, 1, 64, 64)
    np.testing.assert_allclose(predict_proba(loaded, "cnn21", images), predict_proba(model, "cnn21", images), rtol=1e-6)


@pytest.mark.parametrize(("name", "arch"), [(n, {}) for n in MODEL_NAMES] + [
    ("vgg16", {"batch_norm": True}), ("inception_v3", {"transform_input": True})])
def test_from_state_is_the_network_get_model_and_load_state_dict_give(built: dict[str, nn.Module], name: str,
                                                                      arch: dict) -> None:
    """from_state skips the random initialisation (a meta-device build): its network must hold exactly the state,
    the ImageNet statistics outside it included, and compute what the initialised network loaded alike computes."""
    torch.manual_seed(5)
    source = built[name] if not arch else get_model(name, 2, **arch)
    source.train()
    source(torch.rand(2, 1, *TEST_SHAPE[name]))  # non-default BatchNorm statistics travel too
    state = source.state_dict()
    torch.manual_seed(6)
    reference = get_model(name, 2, **arch)
    reference.load_state_dict(state)
    loaded = from_state(name, 2, state, **arch)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert loaded.state_dict().keys() == state.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    for mine, theirs in zip(loaded.buffers(), reference.buffers()):  # the non-persistent ImageNet statistics too
        assert torch.equal(mine, theirs)
    images = torch.rand(3, 1, *TEST_SHAPE[name])
    np.testing.assert_array_equal(predict_proba(loaded, name, images), predict_proba(reference.eval(), name, images))


@pytest.mark.parametrize("name", ["cnn21", "resnet50"])
def test_predict_proba_in_channels_last_matches_a_plain_fp32_forward(built: dict[str, nn.Module], name: str) -> None:
    """predict_proba runs channels_last (faster on oneDNN): the probabilities are the contiguous fp32 forward's."""
    torch.manual_seed(2)
    model = get_model(name, 2)
    model.load_state_dict(built[name].state_dict() if name != "cnn21" else model.state_dict())
    images = torch.rand(6, 1, *TEST_SHAPE[name])
    with torch.no_grad():
        plain = torch.softmax(get_spec(name).unwrap(model.eval()(images))[0], dim=1).double().numpy()
    np.testing.assert_allclose(predict_proba(model, name, images), plain, atol=1e-5)
    np.testing.assert_array_equal(predict_proba(model, name, images), predict_proba(model, name, images))


def test_from_state_leaves_no_uninitialised_buffer_when_a_state_omits_batchnorm_counters() -> None:
    """PyTorch accepts a state without ``num_batches_tracked`` (it keeps the module's own): from_state's is 0, as
    get_model's would be, never the uninitialised memory of the meta-device build."""
    torch.manual_seed(0)
    state = {k: v for k, v in CNN21(num_classes=2).state_dict().items() if not k.endswith("num_batches_tracked")}
    loaded = from_state("cnn21", 2, state)
    counters = [b for n, b in loaded.named_buffers() if n.endswith("num_batches_tracked")]
    assert counters and all(int(c) == 0 for c in counters)


def test_from_state_names_the_source_of_a_state_that_does_not_fit() -> None:
    with pytest.raises(RuntimeError, match=r"fold1/done.pt: state dict does not match model 'cnn21'"):
        from_state("cnn21", 2, {"weight": torch.zeros(2)}, source="fold1/done.pt")
    with pytest.raises(RuntimeError, match=r"Missing key"):
        from_state("cnn21", 2, {k: v for k, v in CNN21(num_classes=2).state_dict().items() if "bias" not in k})


def test_load_trained_inception_round_trip(tmp_path: Path, built: dict[str, nn.Module]) -> None:
    _save_trained(tmp_path / "inc", "inception_v3", built["inception_v3"])
    loaded, _ = load_trained(tmp_path / "inc")
    probs = predict_proba(loaded, "inception_v3", torch.rand(3, 1, *TEST_SHAPE["inception_v3"]))
    assert probs.shape == (3, 2)  # one column per class


@pytest.mark.parametrize(
    ("setup", "error", "message"),
    [
        ("no_meta", FileNotFoundError, r"meta.json: not found"),
        ("no_weights", FileNotFoundError, r"model.pt: not found"),
        ("no_model_key", ValueError, r"meta.json: missing key\(s\) \['model'\]"),
        ("unknown_model", ValueError, r"unknown model 'lenet'"),
        ("wrong_arch", RuntimeError, r"model.pt: state dict does not match model 'cnn21'"),
        ("wrong_classes", RuntimeError, r"model.pt: state dict does not match"),
    ],
)
def test_load_trained_errors(tmp_path: Path, setup: str, error: type[Exception], message: str) -> None:
    model_dir = tmp_path / "m"
    cnn = CNN21()
    if setup == "wrong_arch":
        _save_trained(model_dir, "cnn21", nn.Sequential(nn.Linear(2, 2)))
    elif setup == "wrong_classes":
        _save_trained(model_dir, "cnn21", cnn, classes=["a", "b", "c"])
    elif setup == "unknown_model":
        _save_trained(model_dir, "lenet", cnn)
    else:
        _save_trained(model_dir, "cnn21", cnn)
        if setup == "no_meta":
            (model_dir / "meta.json").unlink()
        elif setup == "no_weights":
            (model_dir / "model.pt").unlink()
        elif setup == "no_model_key":
            (model_dir / "meta.json").write_text(json.dumps({"classes": ["normal", "osteoporosis"]}))
    with pytest.raises(error, match=message):
        load_trained(model_dir)


def test_predict_proba_batches_agree_and_mode_is_restored() -> None:
    torch.manual_seed(0)
    model = get_model("cnn21", 2).train()
    images = torch.rand(7, 1, 64, 64)
    one = predict_proba(model, "cnn21", images, batch_size=1)
    many = predict_proba(model, "cnn21", images, batch_size=32)
    assert one.shape == (7, 2) and one.dtype == np.float64
    assert ((one >= 0) & (one <= 1)).all()
    np.testing.assert_allclose(one.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(one, many, rtol=1e-5, atol=1e-7)  # eval mode: batch norm uses running stats
    assert model.training
    assert predict_proba(model, "cnn21", torch.zeros(0, 1, 64, 64)).shape == (0, 2)
    three = predict_proba(get_model("cnn21", 3), "cnn21", images)
    assert three.shape == (7, 3) and np.allclose(three.sum(axis=1), 1.0)


@pytest.mark.parametrize(
    ("shape", "batch_size", "message"),
    [((2, 3, 64, 32), 4, r"expected images N x 1 x H x W"), ((2, 1, 64, 32), 0, r"batch_size must be >= 1")],
)
def test_predict_proba_rejects_bad_input(shape: tuple[int, ...], batch_size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        predict_proba(CNN21(), "cnn21", torch.rand(*shape), batch_size=batch_size)
