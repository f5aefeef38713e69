"""Untrusted files: opening a checkpoint, a study or a manifest someone sent never runs code.

Checkpoints load only from safetensors (a pickle beside them is never opened: a payload that
would create a marker file never runs); nothing in a study is unpickled or evaluated;
manifest paths cannot leave the manifest's folder (absolute, '..', or a symbolic link); the
app binds to 127.0.0.1 unless told otherwise and shows text from files as text.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - registers the codecs for h5py
import numpy as np
import pytest
import yaml

import circuits
from circuits import store
from circuits.errors import CircuitsError

ROOT = Path(__file__).resolve().parent.parent


class Payload:
    """Unpickling this creates ``marker``: proof that a pickle was opened."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def payload(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


@pytest.fixture
def run_copy(induction_run, tmp_path) -> Path:
    """A run folder with two real checkpoints (the run's first and last, as steps 0 and 600)."""
    return _two_step_run(induction_run, tmp_path / "run")


def _two_step_run(induction_run: Path, run: Path) -> Path:
    run.mkdir()
    data = yaml.safe_load((induction_run / "manifest.yaml").read_text())
    for step, source in ((0, data["steps"][0]), (600, data["steps"][-1])):
        shutil.copytree(induction_run / f"step{source}", run / f"step{step}")
    data["steps"] = [0, 600]
    (run / "manifest.yaml").write_text(yaml.safe_dump(data))
    return run


# ---------------------------------------------------------------- checkpoints


def test_a_native_checkpoint_with_only_a_pickle_is_refused_and_the_pickle_never_runs(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    step = run_copy / "step600"
    (step / "model.safetensors").unlink()
    (step / "pytorch_model.bin").write_bytes(payload(marker))
    (step / "model.pt").write_bytes(payload(marker))
    with pytest.raises(CircuitsError, match=r"step600: missing model\.safetensors \(checkpoints load only from safetensors\)"):
        circuits.load(run_copy, 600)
    assert not marker.exists()


def test_a_pickle_named_safetensors_is_refused_and_never_runs(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    (run_copy / "step600" / "model.safetensors").write_bytes(payload(marker))
    with pytest.raises(CircuitsError, match=r"model\.safetensors: damaged, or does not match its config\.json"):
        circuits.load(run_copy, 600)
    assert not marker.exists()


def test_a_hugging_face_folder_with_a_pickle_as_its_only_weights_is_refused(run_copy, tmp_path):
    """PyTorch weights are read only through torch.load(weights_only=True): a payload is refused, unrun."""
    marker = tmp_path / "pwned"
    step = run_copy / "step600"
    for f in step.iterdir():
        f.unlink()
    (step / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
                                                  "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1,
                                                  "intermediate_size": 16, "vocab_size": 64}))
    (step / "pytorch_model.bin").write_bytes(payload(marker))
    with pytest.raises(CircuitsError, match=r"pytorch_model\.bin: holds a pickled object other than tensors and plain "
                                            r"values; refused \(PyTorch files are read with torch\.load\(weights_only=True\)"):
        circuits.load(run_copy, 600)
    assert not marker.exists()


def test_no_code_path_unpickles_or_evaluates():
    """The library and the app never call the loaders that run code from data (torch.load only
    with weights_only=True, which rebuilds tensors and plain values and runs nothing)."""
    banned = re.compile(r"\bpickle\.loads?\(|\btorch\.load\((?![^)]*weights_only=True)|\bnp\.load\(.*allow_pickle=True|\byaml\.load\(|"
                        r"\byaml\.unsafe_load|(?<![.\w])eval\(|(?<![.\w])exec\(|\bunsafe_allow_html=True|\bmarshal\.loads?\(")
    hits = [f"{path.relative_to(ROOT)}:{i}" for folder in ("circuits", "app") for path in (ROOT / folder).rglob("*.py")
            for i, line in enumerate(path.read_text().splitlines(), 1) if banned.search(line)]
    assert hits == []


# ---------------------------------------------------------------- studies


@pytest.fixture(scope="module")
def swept_study(induction_run, tmp_path_factory) -> Path:
    from circuits.sweep import sweep

    root = tmp_path_factory.mktemp("untrusted")
    out = root / "study"
    sweep(_two_step_run(induction_run, root / "run"), "induction", out, steps="0,600", n_examples=3, batch_size=3,
          progress=False)
    return out


@pytest.fixture
def study_path(swept_study, tmp_path) -> Path:
    """A copy of a real study of the two-step run, for a test to tamper with."""
    return shutil.copytree(swept_study, tmp_path / "study")


def test_pickled_attributes_and_opaque_data_in_a_study_are_never_unpickled(study_path, tmp_path):
    marker = tmp_path / "pwned"
    bad = payload(marker)
    with h5py.File(study_path / store.SHARD_DIR / store.shard_name(0), "a") as f:
        f.attrs["provenance"] = np.void(bad)  # an opaque blob where JSON text belongs
        f.attrs["extra"] = np.void(bad)
        f.create_dataset("heads/pickled", data=np.void(bad))
    with h5py.File(study_path / store.SHARD_DIR / store.shard_name(600), "a") as f:
        f.attrs["note"] = np.void(bad)
        f.create_dataset("heads/blob", data=np.frombuffer(bad, dtype=np.uint8))  # bytes as numbers: just numbers
    record = json.loads((study_path / store.STUDY_FILE).read_text())
    record["task"]["prompts"] = [bad.decode("latin-1")] * 3
    record["hook_filter"] = "__import__('os').system('touch pwned')"
    (study_path / store.STUDY_FILE).write_text(json.dumps(record))

    study = circuits.open_study(study_path)
    assert study.steps == [600]
    assert "provenance" in study.problems[0]
    study.pattern(600, 0, 0, 0)
    study.array("heads/blob")
    study.metric()
    study.shard_provenance(600)
    _ = study.task, study.manifest, study.provenance
    with h5py.File(study_path / store.INDEX_FILE, "r"):
        pass
    assert not marker.exists() and not (Path.cwd() / "pwned").exists()


def test_a_script_tag_in_a_prompt_is_shown_as_text(study_path):
    """The overview page (AppTest) shows the provenance, prompts included, as JSON text."""
    from streamlit.testing.v1 import AppTest

    record = json.loads((study_path / store.STUDY_FILE).read_text())
    script = "<script>document.title='pwned'</script><img src=x onerror=alert(1)>"
    record["task"]["prompts"] = [script] * 3
    (study_path / store.STUDY_FILE).write_text(json.dumps(record))

    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
    at.query_params["study"] = str(study_path)
    at.run()  # the landing page (Formation), then the Overview, which shows the provenance
    at.switch_page("views/overview.py").run()
    assert not at.exception, [e.value for e in at.exception]
    shown = [e.value for e in at.get("json")]
    assert any(script in json.dumps(json.loads(v) if isinstance(v, str) else v) for v in shown)
    for kind in ("markdown", "caption", "error", "warning", "info", "text"):
        for element in getattr(at, kind):
            assert "<script>" not in str(element.value) or kind == "text", (kind, element.value)
    assert not [e for e in at.get("markdown") if getattr(e.proto, "allow_html", False)
                and "script" in str(e.value)]


# ---------------------------------------------------------------- manifest paths


def _manifest_in(folder: Path, path: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"name": "x", "source": "local", "local": {"path": path}, "tokens_per_step": 1, "steps": [0, 600]}
    (folder / "manifest.yaml").write_text(yaml.safe_dump(data))
    return folder / "manifest.yaml"


@pytest.mark.parametrize("path", ["/etc", "../elsewhere", "ckpts/../../elsewhere", "~/../../etc"])
def test_manifest_paths_cannot_leave_the_manifest_folder(tmp_path, path):
    manifest = _manifest_in(tmp_path / "shared", path)
    try:
        loaded = circuits.load_manifest(manifest)
    except CircuitsError as err:
        assert "relative path inside the manifest's folder" in str(err)
    else:  # '~' is not expanded: a folder literally named '~' inside the manifest's folder
        assert loaded.checkpoint_root.is_relative_to((tmp_path / "shared").resolve())


def test_a_symlink_out_of_the_manifest_folder_is_refused(run_copy, tmp_path):
    shared = tmp_path / "shared"
    manifest = _manifest_in(shared, "ckpts")
    (shared / "ckpts").symlink_to(run_copy, target_is_directory=True)
    with pytest.raises(CircuitsError, match=r"local\.path 'ckpts' leads outside the manifest's folder"):
        circuits.load(manifest, 600)

    (shared / "ckpts").unlink()
    (shared / "ckpts").mkdir()
    (shared / "ckpts" / "step600").symlink_to(run_copy / "step600", target_is_directory=True)
    with pytest.raises(CircuitsError, match=r"step600: a symbolic link leading outside the run's folder"):
        circuits.load(manifest, 600)


def test_a_symlink_inside_the_manifest_folder_is_fine(run_copy):
    (run_copy / "step600").rename(run_copy / "real600")
    (run_copy / "step600").symlink_to(run_copy / "real600", target_is_directory=True)
    assert circuits.load(run_copy, 600).cfg.n_layers == 2


# ---------------------------------------------------------------- the app's address


def test_the_app_binds_loopback_unless_told_otherwise(tmp_path):
    import inspect

    from circuits import app_launcher, cli

    cmd = app_launcher.command(tmp_path)
    assert [a for a in cmd if a.startswith("--server.address")] == ["--server.address=127.0.0.1"]
    for fn in (app_launcher.command, app_launcher.launch, cli.app_command):
        assert inspect.signature(fn).parameters["address"].default == "127.0.0.1", fn
    assert "--server.address=0.0.0.0" in app_launcher.command(tmp_path, address="0.0.0.0")
