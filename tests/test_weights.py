"""spinedxa.weights: where pre-trained weights come from: the published ImageNet files, a verified one-time fetch
(from a loopback HTTP server started and stopped here), imports of local state dicts, records, loading with the
task's head replaced and every mismatched layer named, the train stage's refusal of a missing file and the lineage
its outputs and MLflow runs record. The audit's side is in test_audit.py.

No weights are downloaded. State dicts come from the real architectures (torchvision's builders on the meta device:
keys and shapes, no memory) with each tensor a constant expanded to its shape, so a ResNet-50 "file" is a few hundred
kilobytes and loads through exactly the code a real one does (``torch.load(weights_only=True)``, key and shape checks,
``load_state_dict``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torchvision
import yaml
from conftest import VENV_BIN, dvc_argv, run, stage_main

from spinedxa import tracking, weights
from spinedxa.cli import main
from spinedxa.config import ConfigError, ModelTrainConfig, deep_merge, params_from_dict, read_yaml
from spinedxa.files import sha256_file
from spinedxa.models import get_model
from spinedxa.models.cnn21 import CNN21
from train_factory import EXPERIMENT, make_params, paths_for, raw_params, train_workdir  # noqa: F401 - fixture

DVC = str(VENV_BIN / "dvc")
BASE = ModelTrainConfig(image_size=64, epochs=1, batch_size=2, optimizer="adamw", lr=1e-3, weight_decay=0.0,
                        scheduler="none")
TORCHVISION_ENUMS = {"resnet50": "ResNet50_Weights.IMAGENET1K_V1", "vgg16": "VGG16_Weights.IMAGENET1K_V1",
                     "vgg19": "VGG19_Weights.IMAGENET1K_V1", "inception_v3": "Inception_V3_Weights.IMAGENET1K_V1"}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def cfg(**changes: object) -> ModelTrainConfig:
    return dataclasses.replace(BASE, **changes)


def compact_state(arch: str, **kwargs: object) -> dict[str, torch.Tensor]:
    """The state dict torchvision's ``arch`` would save (its keys, shapes and dtypes), each tensor the constant
    ``i + 1`` (its position) expanded to its shape: a few bytes per tensor on disk, distinct per layer."""
    with torch.device("meta"):
        reference = torchvision.models.get_model(arch, weights=None, **kwargs).state_dict()
    return {k: torch.full((), i + 1, dtype=v.dtype).expand(v.shape) for i, (k, v) in enumerate(reference.items())}


def file_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(file_bytes(state))
    return path


def leftovers(root: Path) -> list[str]:
    """Files under ``root/weights`` (a refused fetch or import leaves none)."""
    return sorted(p.relative_to(root).as_posix() for p in (root / "weights").rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------- loopback server


class Loopback:
    """An HTTP server on 127.0.0.1 serving ``files`` (URL path -> (body, bytes actually sent)); it counts requests."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, int]] = {}
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                owner.requests.append(self.path)
                if self.path not in owner.files:
                    self.send_error(404, "no such file")
                    return
                body, sent = owner.files[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))  # the whole file, even when less is sent
                self.end_headers()
                self.wfile.write(body[:sent])
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def serve(self, name: str, body: bytes, sent: int | None = None) -> str:
        self.files[f"/{name}"] = (body, len(body) if sent is None else sent)
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"


@pytest.fixture
def loopback() -> Iterator[Loopback]:
    server = Loopback()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()
        server.thread.join(timeout=10)


@pytest.fixture(scope="module")
def resnet50_file() -> bytes:
    return file_bytes(compact_state("resnet50"))


@pytest.fixture(scope="module")
def _dvc_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dvc-template") / "repo"
    root.mkdir()
    run(["git", "init", "-q", "-b", "main"], root)
    run([DVC, "init", "-q"], root)
    return root


@pytest.fixture
def dvc_repo(_dvc_template: Path, tmp_path: Path) -> Path:
    """A fresh git + DVC repository (a copy of one made once per module)."""
    return Path(shutil.copytree(_dvc_template, tmp_path / "repo", symlinks=True))


# ------------------------------------------------------------------------------------------- published files


@pytest.mark.parametrize(("model", "batch_norm", "arch"), [
    ("resnet50", False, "resnet50"), ("vgg16", False, "vgg16"), ("vgg16", True, "vgg16_bn"),
    ("vgg19", True, "vgg19_bn"), ("inception_v3", False, "inception_v3"),
])
def test_imagenet_file_is_torchvisions_published_file(model: str, batch_norm: bool, arch: str) -> None:
    enum = TORCHVISION_ENUMS[model].replace("_Weights.", "_BN_Weights." if batch_norm else "_Weights.")
    url = torchvision.models.get_weight(enum).url
    published = weights.imagenet_file(model, batch_norm)
    assert published.url == url and published.enum == enum
    assert published.file_name == url.rsplit("/", 1)[1] and published.file_name.startswith(arch)
    assert len(published.hash_prefix) >= 8 and f"-{published.hash_prefix}." in published.file_name


@pytest.mark.parametrize(("model", "batch_norm", "message"), [
    ("cnn21", False, "cnn21 has no ImageNet weights"),
    ("resnet50", True, "resnet50 has none"),
    ("alexnet", False, "unknown model 'alexnet'"),
])
def test_imagenet_file_refuses_what_torchvision_does_not_publish(model: str, batch_norm: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        weights.imagenet_file(model, batch_norm)


# ------------------------------------------------------------------------------------------- fetch


def test_fetch_keeps_a_verified_file_and_records_it(loopback: Loopback, resnet50_file: bytes, tmp_path: Path) -> None:
    sha = hashlib.sha256(resnet50_file).hexdigest()
    name = f"resnet50-{sha[:8]}.pth"
    published = weights.PublishedFile(loopback.serve(name, resnet50_file), name, sha[:8], "test")
    source = weights.fetch("resnet50", root=tmp_path, published=published, track=False)

    assert source == weights.WeightsSource("imagenet", "resnet50", "resnet50", f"weights/resnet50/{name}", sha,
                                           published.url)
    assert (tmp_path / source.path).read_bytes() == resnet50_file
    record = json.loads((tmp_path / f"weights/resnet50/{name}.json").read_text())
    assert record == {"kind": "imagenet", "model": "resnet50", "variant": "resnet50", "file": name, "sha256": sha,
                      "size": len(resnet50_file), "url": published.url, "published_url": published.url,
                      "published_sha256_prefix": sha[:8], "weights_enum": "test",
                      "torchvision": torchvision.__version__.split("+")[0]}
    assert leftovers(tmp_path) == [f"weights/resnet50/{name}", f"weights/resnet50/{name}.json"]
    # Once there and matching its record, nothing is downloaded again.
    assert weights.fetch("resnet50", root=tmp_path, published=published, track=False) == source
    assert loopback.requests == [f"/{name}"]


def test_fetch_from_a_mirror_url_keeps_the_published_name(loopback: Loopback, resnet50_file: bytes,
                                                          tmp_path: Path) -> None:
    sha = hashlib.sha256(resnet50_file).hexdigest()
    published = weights.PublishedFile("https://unreachable.invalid/x.pth", f"resnet50-{sha[:8]}.pth", sha[:8])
    mirror = loopback.serve("mirror/copy.pth", resnet50_file)
    source = weights.fetch("resnet50", root=tmp_path, published=published, url=mirror, track=False)
    assert source.path == f"weights/resnet50/resnet50-{sha[:8]}.pth" and source.url == mirror
    record = weights.read_record(tmp_path / source.path)
    assert record["url"] == mirror and record["published_url"] == published.url


@pytest.mark.parametrize("case", ["wrong hash", "truncated", "missing", "not a state dict", "wrong layers"])
def test_fetch_refuses_a_bad_download_and_leaves_nothing(loopback: Loopback, resnet50_file: bytes, tmp_path: Path,
                                                         case: str) -> None:
    body = {"not a state dict": b"<html>mirror error page</html>",
            "wrong layers": file_bytes(compact_state("resnet18"))}.get(case, resnet50_file)
    sha = hashlib.sha256(body).hexdigest()
    prefix = "00000000" if case == "wrong hash" else sha[:8]
    name = f"resnet50-{prefix}.pth"
    url = loopback.serve(name, body, sent=len(body) // 2 if case == "truncated" else None)
    if case == "missing":
        url += ".gone"
    message = {"wrong hash": f"sha256 {sha} does not start with 00000000", "truncated": "truncated transfer: "
               f"{len(body) // 2} of {len(body)} bytes", "missing": "HTTP 404",
               "not a state dict": "not a weights-only torch file",
               "wrong layers": "does not fit resnet50"}[case]
    with pytest.raises(weights.WeightsError, match=message):
        weights.fetch("resnet50", root=tmp_path, published=weights.PublishedFile(url, name, prefix), track=False)
    assert leftovers(tmp_path) == []


def test_fetch_command_refuses_a_file_without_torchvisions_published_hash(
        loopback: Loopback, resnet50_file: bytes, dvc_repo: Path, capsys: pytest.CaptureFixture) -> None:
    """The real published name decides: a generated file served as torchvision's ResNet-50 is refused (exit 1)."""
    published = weights.imagenet_file("resnet50")
    url = loopback.serve(published.file_name, resnet50_file)
    assert main(["weights", "fetch", "resnet50", "--url", url, "--root", str(dvc_repo)]) == 1
    err = capsys.readouterr().err
    assert f"does not start with {published.hash_prefix}" in err and "refused" in err and "Traceback" not in err
    assert leftovers(dvc_repo) == []


def test_fetch_command_needs_a_dvc_repository(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["weights", "fetch", "resnet50", "--root", str(tmp_path), "--url", "http://127.0.0.1:9/x"]) == 2
    assert "not a DVC repository" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- import


def test_import_command_records_and_dvc_adds_the_file(dvc_repo: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    src = save(compact_state("resnet50"), tmp_path / "outside" / "RadImageNet-ResNet50.pt")
    assert main(["weights", "import", "resnet50", str(src), "--origin", "https://example.org/radimagenet",
                 "--root", str(dvc_repo)]) == 0
    out = capsys.readouterr().out
    rel = "weights/resnet50/RadImageNet-ResNet50.pt"
    assert f"train.resnet50.weights: {rel}" in out and "git add" in out
    record = weights.read_record(dvc_repo / rel)
    assert record == {"kind": "imported", "model": "resnet50", "variant": "resnet50", "file": src.name,
                      "sha256": sha256_file(src), "size": src.stat().st_size, "url": "https://example.org/radimagenet",
                      "source_name": src.name}
    dvc_file = yaml.safe_load((dvc_repo / f"{rel}.dvc").read_text())
    assert dvc_file["outs"][0]["path"] == src.name and dvc_file["outs"][0]["size"] == src.stat().st_size
    run(["git", "check-ignore", "-q", rel], dvc_repo)  # the blob is DVC's, not git's
    assert run([DVC, "status", "-q"], dvc_repo, check=False).returncode == 0
    assert str(tmp_path) not in json.dumps(record)  # no absolute path (it could name a person)


@pytest.mark.parametrize(("arch", "batch_norm", "ok"), [
    ("vgg16", False, True),  # torchvision's 7 x 7-grid classifier.0 (25088 inputs): a head layer here, exempt
    ("vgg16_bn", True, True),
    ("vgg16", True, False),  # the plain file for the BatchNorm variant: every BatchNorm is missing
])
def test_import_checks_vgg_files_against_the_variant_that_trains(tmp_path: Path, arch: str, batch_norm: bool,
                                                                 ok: bool) -> None:
    src = save(compact_state(arch), tmp_path / f"{arch}.pth")
    if ok:
        source = weights.import_file("vgg16", src, batch_norm=batch_norm, root=tmp_path, track=False)
        assert source.variant == arch
        return
    with pytest.raises(weights.WeightsMismatchError, match=r"does not fit vgg16_bn .*missing from the file: [^;]*"
                                                            r"features\.1\.weight"):
        weights.import_file("vgg16", src, batch_norm=batch_norm, root=tmp_path, track=False)
    assert leftovers(tmp_path) == []


# How a ResNet-50 state dict is broken, how many layers that breaks, and what the error must say about them.
BROKEN = {
    "missing": (2, "missing from the file: layer1.0.conv1.weight, layer4.2.bn3.running_var"),
    "unexpected": (1, "not in the model: layer5.0.conv1.weight"),
    "shape": (1, "shape differs: layer4.2.conv3.weight (file (2048, 512, 3, 3), model (2048, 512, 1, 1))"),
}


def _broken(cases: list[str]) -> dict[str, torch.Tensor]:
    state = compact_state("resnet50")
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's 1000-class head: never a mismatch
    if "missing" in cases:
        del state["layer1.0.conv1.weight"], state["layer4.2.bn3.running_var"]
    if "unexpected" in cases:
        state["layer5.0.conv1.weight"] = torch.zeros(3)
    if "shape" in cases:
        state["layer4.2.conv3.weight"] = torch.zeros(2048, 512, 3, 3)
    return state


@pytest.mark.parametrize("cases", [["missing"], ["unexpected"], ["shape"], ["missing", "unexpected", "shape"]],
                         ids=["missing", "unexpected", "shape", "all three"])
def test_mismatched_layers_are_each_named(tmp_path: Path, cases: list[str]) -> None:
    state = _broken(cases)
    with pytest.raises(weights.WeightsMismatchError) as info:
        weights.load_into(get_model("resnet50", 3), "resnet50", state, "lab.pt")
    message = str(info.value)
    assert message.startswith("lab.pt: does not fit resnet50")
    assert f"({sum(BROKEN[c][0] for c in cases)} mismatched layer(s)" in message
    assert all(BROKEN[c][1] in message for c in cases), message
    assert "fc.weight" not in message.split("exempt")[1]  # the replaced head is no mismatch
    src = save(state, tmp_path / "lab.pt")
    with pytest.raises(weights.WeightsMismatchError, match="lab.pt: does not fit resnet50"):
        weights.import_file("resnet50", src, root=tmp_path, track=False)
    assert leftovers(tmp_path) == []


def test_import_refuses_another_file_under_a_recorded_name(tmp_path: Path) -> None:
    first = save(compact_state("resnet50"), tmp_path / "a" / "lab.pt")
    weights.import_file("resnet50", first, root=tmp_path, track=False)
    other = compact_state("resnet50")
    other["conv1.weight"] = torch.zeros(64, 3, 7, 7)
    second = save(other, tmp_path / "b" / "lab.pt")
    with pytest.raises(weights.WeightsError, match="already holds another file"):
        weights.import_file("resnet50", second, root=tmp_path, track=False)
    assert weights.read_record(tmp_path / "weights/resnet50/lab.pt")["sha256"] == sha256_file(first)


# ------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("legacy", [False, True], ids=["current", "no num_batches_tracked"])
def test_compatible_weights_load_and_the_head_is_new_for_three_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        legacy: bool) -> None:
    """``legacy``: a file saved before PyTorch 0.4.1 (some of torchvision's) has no BatchNorm counters; it fits."""
    monkeypatch.chdir(tmp_path)
    state = compact_state("resnet50")
    if legacy:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    weights.import_file("resnet50", save(state, tmp_path / "lab.pt"), root=".", track=False)
    train_cfg = cfg(weights="weights/resnet50/lab.pt")
    source = weights.resolve("resnet50", train_cfg)
    assert source == weights.WeightsSource("imported", "resnet50", "resnet50", "weights/resnet50/lab.pt",
                                           sha256_file("weights/resnet50/lab.pt"), None)
    torch.manual_seed(0)
    model = weights.build_model("resnet50", 3, train_cfg, source)
    net = model.backbone
    for key in ("conv1.weight", "layer1.0.bn3.weight", "layer4.2.conv3.weight", "layer4.2.bn3.running_mean"):
        assert torch.equal(net.state_dict()[key], state[key].expand_as(net.state_dict()[key])), key
    # zero_init_residual of a from-scratch ResNet-50 does not survive: the file's residual scales do.
    assert float(net.layer1[0].bn3.weight.detach().min()) == float(state["layer1.0.bn3.weight"].max()) > 0
    assert net.fc.out_features == 3 and net.fc.weight.std() > 0  # the task's head, freshly initialised
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 64, 32)).shape == (2, 3)


@pytest.mark.parametrize("wrapped", ["state_dict", "model", "module.", "backbone."])
def test_common_checkpoint_layouts_load(tmp_path: Path, wrapped: str) -> None:
    """A training checkpoint ({"state_dict": ...}), DDP's ``module.`` prefix and spinedxa's own fold models
    (``backbone.``) are state dicts too."""
    state = compact_state("resnet50")
    obj = ({wrapped: state, "epoch": torch.tensor(3)} if "." not in wrapped
           else {f"{wrapped}{k}": v for k, v in state.items()})
    src = save(obj, tmp_path / "ckpt.pt")
    assert weights.read_state(src).keys() == state.keys()
    weights.import_file("resnet50", src, root=tmp_path, track=False)


def test_inception_and_its_aux_head_fit_and_imagenet_sets_transform_input(tmp_path: Path) -> None:
    """torchvision's InceptionV3 file (its aux head's 1000-class fc included) fits; with ImageNet weights the network
    is built as torchvision builds it (transform_input on), with a file a user brings as plain torchvision does."""
    src = save(compact_state("inception_v3", aux_logits=True, init_weights=False), tmp_path / "inc.pth")
    weights.import_file("inception_v3", src, root=tmp_path, track=False)
    assert weights.architecture("inception_v3", cfg(weights="imagenet")) == {"batch_norm": False,
                                                                              "transform_input": True}
    assert weights.architecture("inception_v3", cfg(weights="weights/inception_v3/inc.pth"))["transform_input"] is False
    assert weights.architecture("resnet50", cfg(weights="imagenet"))["transform_input"] is False


def test_verify_refuses_a_file_that_changed_since_its_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    weights.import_file("resnet50", save(compact_state("resnet50"), tmp_path / "lab.pt"), root=".", track=False)
    source = weights.resolve("resnet50", cfg(weights="weights/resnet50/lab.pt"))
    path = Path(source.path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(weights.WeightsError, match=r"weights/resnet50/lab.pt: sha256 \w+ differs from "
                                                     rf"{source.sha256} recorded .*dvc checkout"):
        weights.build_model("resnet50", 3, cfg(weights=source.path), source)


# ------------------------------------------------------------------------------------------- resolving params


@pytest.mark.parametrize(("model", "changes", "setup", "error", "message"), [
    ("resnet50", {}, None, None, "none"),
    ("cnn21", {"weights": "imagenet"}, None, ConfigError, r"train.cnn21.weights: cnn21 has no ImageNet weights"),
    ("resnet50", {"weights": "/abs/lab.pt"}, None, ConfigError, r"'/abs/lab.pt' is not a file in weights/resnet50/"),
    ("resnet50", {"weights": "weights/vgg16/lab.pt"}, None, ConfigError, "is not a file in weights/resnet50/"),
    ("resnet50", {"weights": "imagenet"}, None, weights.WeightsNotFoundError,
     r"weights/resnet50/resnet50-0676ba61.pth: no such weights .*`spinedxa weights fetch resnet50`"),
    ("vgg16", {"weights": "imagenet", "batch_norm": True}, None, weights.WeightsNotFoundError,
     r"vgg16_bn-6c64b313.pth: .*`spinedxa weights fetch vgg16 --batch-norm`"),
    ("resnet50", {"weights": "weights/resnet50/lab.pt"}, None, weights.WeightsNotFoundError,
     r"`spinedxa weights import resnet50 <path of lab.pt>`"),
    ("resnet50", {"weights": "weights/resnet50/lab.pt"}, "blob missing", weights.WeightsNotFoundError,
     r"missing from the workspace, but its record .* is committed: run `dvc pull weights/resnet50/lab.pt`"),
    ("resnet50", {"weights": "weights/resnet50/lab.pt"}, "recorded", None, "imported"),
])
def test_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, changes: dict, setup: str | None,
                 error: type[Exception] | None, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    if setup:
        weights.import_file("resnet50", save(compact_state("resnet50"), tmp_path / "lab.pt"), root=".", track=False)
        if setup == "blob missing":
            Path("weights/resnet50/lab.pt").unlink()
    if error is None:
        assert weights.resolve(model, cfg(**changes)).kind == message
        return
    with pytest.raises(error, match=message):
        weights.resolve(model, cfg(**changes))


def test_a_file_recorded_for_another_variant_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    weights.import_file("vgg16", save(compact_state("vgg16"), tmp_path / "v.pth"), root=".", track=False)
    with pytest.raises(ConfigError, match=r"recorded as imported weights of vgg16 .*trains vgg16_bn"):
        weights.resolve("vgg16", cfg(weights="weights/vgg16/v.pth", batch_norm=True))


def test_paper_profile_asks_for_torchvisions_files(repo_root: Path) -> None:
    """profiles/paper.yaml's `weights: imagenet` names, for each network, the file `spinedxa weights fetch` brings
    in (this checkout holds none, so training would stop with the command to run)."""
    params = params_from_dict(deep_merge(read_yaml(repo_root / "params.yaml"),
                                         read_yaml(repo_root / "profiles/paper.yaml")))
    for model in ("resnet50", "vgg16", "vgg19", "inception_v3"):
        block = params.train.model(model)
        assert block.weights == "imagenet" and not block.batch_norm
        with pytest.raises(weights.WeightsNotFoundError, match=rf"`spinedxa weights fetch {model}`"):
            weights.resolve(model, block, repo_root / "weights" / model)


def test_every_model_has_a_weights_directory_the_train_stage_depends_on(repo_root: Path) -> None:
    from spinedxa import dag

    tracked = dag.git_tracked(repo_root)
    for stage in (s for s in dag.load_stages(repo_root) if s.verb == "train"):
        directory = f"weights/{stage.item}"
        assert directory in stage.dep_paths and f"--weights {directory}" in stage.cmd
        assert dag.is_tracked(directory, tracked)  # present in every clone (.gitkeep), so `weights: none` works


# ------------------------------------------------------------------------------------------- the train stage


@pytest.fixture
def workdir(train_workdir: Path) -> Path:  # noqa: F811 - the fixture imported above
    return train_workdir


def test_training_refuses_a_missing_file_naming_the_command(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    """The stage as dvc.yaml runs it: exit 1 with one line naming the file and the command, no traceback."""
    params = make_params(cnn21={"weights": "weights/cnn21/lab.pt"})
    Path("params.yaml").write_text(yaml.safe_dump(raw_params(params)), encoding="utf-8")
    assert stage_main("train")(dvc_argv("train", model="cnn21")) == 1
    err = capsys.readouterr().err
    assert "ERROR spinedxa.train: weights/cnn21/lab.pt: no such weights" in err and "Traceback" not in err
    assert "`spinedxa weights import cnn21 <path of lab.pt>`" in err
    assert not Path("models/cnn21").exists() and tracking.find_runs(EXPERIMENT) == []  # stopped before any work


def test_training_starts_from_imported_weights_and_names_them(workdir: Path) -> None:
    from spinedxa.train import train_model

    torch.manual_seed(5)
    lab = CNN21(num_classes=5)  # a lab's own cnn21 for 5 classes: its head is replaced for the task's 2
    weights.import_file("cnn21", save(lab.state_dict(), workdir / "lab" / "lab.pt"), root=".", track=False)
    sha = sha256_file("weights/cnn21/lab.pt")
    params = make_params(cnn21={"weights": "weights/cnn21/lab.pt"})
    source = weights.resolve("cnn21", params.train.cnn21)
    started = weights.build_model("cnn21", 2, params.train.cnn21, source)
    assert torch.equal(started.features.conv1.weight, lab.features.conv1.weight) and started.fc.out_features == 2

    train_model(params, "cnn21", paths_for("cnn21"))
    expected = {"kind": "imported", "variant": "cnn21", "path": "weights/cnn21/lab.pt", "sha256": sha, "url": None}
    assert json.loads(Path("models/cnn21/meta.json").read_text())["weights"] == expected
    for k in (0, 1):
        meta = json.loads(Path(f"models/cnn21/fold{k}/meta.json").read_text())
        assert meta["weights"] == expected and meta["transform_input"] is False
    runs = tracking.find_runs(EXPERIMENT)
    assert len(runs) == 3
    for r in runs:
        assert (r["params"]["weights_kind"], r["params"]["weights_file"], r["params"]["weights_sha256"]) == (
            "imported", "weights/cnn21/lab.pt", sha)


def test_dvc_add_output_is_what_git_keeps(dvc_repo: Path, tmp_path: Path) -> None:
    """After an import the files git should commit are exactly the record, the .dvc file and the .gitignore."""
    src = save(compact_state("resnet50"), tmp_path / "lab.pt")
    weights.import_file("resnet50", src, root=dvc_repo)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "weights"], cwd=dvc_repo,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    assert sorted(line[3:] for line in status if line) == [
        "weights/resnet50/.gitignore", "weights/resnet50/lab.pt.dvc", "weights/resnet50/lab.pt.json"]
