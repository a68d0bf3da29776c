"""The package as a new user installs it: the built wheel without extras, in a fresh virtual environment.

`make test` installs every extra, so nothing else in the suite can see what the bare install lacks. This builds
the wheel, installs it beside ``torch==2.13.0`` (pip takes the local wheel: no download) and runs the command line
on a user's own model the way the README shows. Catches: a start-up import of an extra (matplotlib, scipy, faiss,
transformers), a subcommand's --help that loads the applications, a study command that dies with a traceback
instead of naming its extra, an integration that raises a bare ModuleNotFoundError."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    "train",
    "demo",
    "analyze",
    "report",
    "upgrade-run",
    "bench",
    "eval",
    "featurize",
    "score",
    "topk",
    "inspect",
    "explore",
]
STUDY_CALLS = {
    "train": ["train", "parity"],
    "demo": ["demo", "--quick"],
    "analyze": ["analyze", "parity", "--run", "x"],
    "report": ["report", "--run", "x"],
    "upgrade-run": ["upgrade-run", "--run", "x", "--preset", "small"],
    "bench": ["bench", "scale"],
    "eval": ["eval", "--smoke"],
}

USER_MODEL = textwrap.dedent(
    """
    import sys
    import torch, torch.nn as nn, torch.nn.functional as F

    class Looped(nn.Module):  # a user's own looped model: one block applied 3 times, additive injection
        def __init__(self, d=8, vocab=7):
            super().__init__()
            self.emb, self.block, self.head = nn.Embedding(vocab, d), nn.Linear(d, d), nn.Linear(d, vocab)
        def forward(self, x):
            e = self.emb(x); h = torch.zeros_like(e)
            for _ in range(3):
                h = torch.tanh(self.block(h) + e)
            return self.head(h)

    def make_model():
        torch.manual_seed(0)
        return Looped()

    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(1)

    def dataset(role):
        g = torch.Generator().manual_seed(0 if role == "train" else 1)
        x = torch.randint(0, 7, (20 if role == "train" else 6, 5), generator=g)
        return torch.utils.data.TensorDataset(x, x.roll(1, 1))

    if __name__ == "__main__":
        torch.save({"model": make_model().state_dict(), "lr": 0.1}, sys.argv[1])
    """
)


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> Path:
    """A fresh venv holding torch==2.13.0 and the built looptrace wheel, nothing else of ours."""
    tmp = tmp_path_factory.mktemp("bare")
    src = tmp / "src"  # build from a copy: a build in place leaves build/ and *.egg-info in the checkout
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheel = _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
         str(src)], tmp)  # fmt: skip
    assert wheel.returncode == 0, wheel.stderr[-2000:]
    (whl,) = (tmp / "dist").glob("looptrace-*.whl")
    venv = tmp / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)], tmp).returncode == 0
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    torch_ = _run([*pip, "torch==2.13.0"], tmp)
    assert torch_.returncode == 0, f"could not install the local torch wheel: {torch_.stderr[-2000:]}"
    pkg = _run([*pip, str(whl)], tmp)
    assert pkg.returncode == 0, pkg.stderr[-2000:]
    return venv


def _bin(venv: Path, name: str) -> str:
    return str(venv / "bin" / name)


def test_no_extra_is_installed(bare: Path) -> None:
    code = "import importlib.util as u; print([m for m in ('matplotlib','scipy','faiss','transformers','lightning') if u.find_spec(m)])"
    out = _run([_bin(bare, "python"), "-c", code], bare)
    assert out.stdout.strip() == "[]", f"the bare venv is not bare: {out.stdout} {out.stderr}"


def test_every_help_works_and_study_commands_name_their_extra(bare: Path) -> None:
    """The console script's --help, then in one process (torch imports once) every subcommand's --help and every
    study command's one-line error."""
    out = _run([_bin(bare, "looptrace"), "--help"], bare)
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr[-2000:]
    code = textwrap.dedent(
        f"""
        import contextlib, io, json
        from looptrace.cli import main
        res = {{}}
        for cmd in {COMMANDS!r}:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                try:
                    main([cmd, "--help"])
                except SystemExit as e:
                    res[cmd + " --help"] = [e.code, "usage:" in buf.getvalue()]
        for cmd, argv in {STUDY_CALLS!r}.items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                res[cmd] = [main(argv), err.getvalue()]
        print(json.dumps(res))
        """
    )
    out = _run([_bin(bare, "python"), "-c", code], bare)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for cmd in COMMANDS:
        assert res[f"{cmd} --help"] == [0, True], f"`looptrace {cmd} --help` in the bare install: {res}"
    for cmd in STUDY_CALLS:
        rc, err = res[cmd]
        assert rc == 2 and err.count("\n") == 1, f"`looptrace {cmd}` in the bare install: {rc} {err!r}"
        assert 'pip install "looptrace[studies]"' in err and f"looptrace {cmd}" in err, err


def test_user_model_end_to_end(bare: Path, tmp_path: Path) -> None:
    """featurize -> score (sdi, tracin) -> topk (brute force, said once) -> inspect, on a module in the working
    directory; the scores equal the same run with every extra installed (this process)."""
    (tmp_path / "usermodel.py").write_text(USER_MODEL)
    py, lt_ = _bin(bare, "python"), _bin(bare, "looptrace")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert _run([py, "usermodel.py", "ck.pt"], tmp_path, env).returncode == 0
    feat = [lt_, "featurize", "--store", "st", "--model", "usermodel:make_model", "--loss", "usermodel:loss_fn",
            "--dataset", "usermodel:dataset", "--step-module", "block", "--checkpoint", "ck.pt", "--dim", "256",
            "--batch-size", "8", "--quiet"]  # fmt: skip
    out = _run(feat, tmp_path, env)
    assert out.returncode == 0, out.stderr[-3000:]
    for kind in ("sdi", "tracin"):
        out = _run([lt_, "score", "--store", "st", "--out", f"{kind}.npy", "--kind", kind], tmp_path, env)
        assert out.returncode == 0, out.stderr[-3000:]
    sdi, tracin = np.load(tmp_path / "sdi.npy"), np.load(tmp_path / "tracin.npy")
    assert sdi.shape == (20, 6, 3) and tracin.shape == (20, 6)
    np.testing.assert_allclose(sdi.sum(-1), tracin, rtol=1e-5, atol=1e-7)
    out = _run([lt_, "topk", "--store", "st", "--k", "3", "--step", "2", "--out", "top.json"], tmp_path, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("FAISS is not installed") == 1 and "Traceback" not in out.stderr, out.stderr
    assert _run([lt_, "inspect", "--store", "st"], tmp_path, env).returncode == 0
    out = _run([lt_, "explore", "--store", "st", "--out", "e.html", "--k", "2"], tmp_path, env)  # assets in the wheel
    assert out.returncode == 0 and 'id="lt-data"' in (tmp_path / "e.html").read_text(), out.stderr[-3000:]

    sys.path.insert(0, str(tmp_path))  # the same featurisation here, with every extra: the same numbers
    try:
        from looptrace.cli import main

        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            assert main([*feat[1:3], "st_full", *feat[4:]]) == 0
            assert main(["score", "--store", "st_full", "--out", "full.npy"]) == 0
        finally:
            os.chdir(cwd)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("usermodel", None)
    np.testing.assert_allclose(np.load(tmp_path / "full.npy"), sdi, rtol=1e-6, atol=1e-9)


def test_integrations_name_their_extra(bare: Path) -> None:
    code = textwrap.dedent(
        """
        import importlib, looptrace as lt
        for mod, extra in (("hf", "hf"), ("lightning", "lightning")):
            try:
                importlib.import_module("looptrace.integrations." + mod)
            except lt.MissingExtraError as e:
                assert f'pip install "looptrace[{extra}]"' in str(e), e
                assert isinstance(e, ImportError)
            else:
                raise SystemExit(mod + " imported without its extra")
        import torch

        class Looped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.core = torch.nn.Linear(4, 4)
            def forward(self, x):
                for _ in range(3):
                    x = torch.tanh(self.core(x))
                return x

        model = Looped()
        assert lt.find_step_module(model, torch.zeros(2, 4)) is model.core  # without transformers installed
        print("ok")
        """
    )
    out = _run([_bin(bare, "python"), "-c", code], bare)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
