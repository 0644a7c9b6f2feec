"""The template adapter passes the whole suite through the CLI and the pytest plugin, with a full receipt."""

import subprocess
import sys

import pytest

from abort_checks import check_abort
from conftest import REPO, _env
from thaw_conformance.results import CHECKS
from thaw_conformance.template.adapter import ToyThawEngine
from thaw_conformance.vectors import default_dir


def test_template_passes_every_check_and_the_vectors(run_cli):
    status, receipt, markdown = run_cli("--engine", "template", "--arch", "all", "--no-cross")
    assert status == 0
    rows = [r for r in receipt["results"] if r["engine"] == "template"]
    assert {(r["arch"], r["check"]) for r in rows} == {(a, c) for a in ("toy", "toy-seed1") for c in CHECKS}
    assert all(r["status"] == "passed" for r in rows), [r for r in rows if r["status"] != "passed"]
    vectors = [r for r in receipt["results"] if r["engine"] == "format"]
    golden = sorted(path.stem for path in default_dir().glob("*.thaw"))
    assert golden and sorted({r["arch"] for r in vectors}) == golden and len(vectors) == 2 * len(golden)
    assert all(r["status"] == "passed" for r in vectors)
    assert "| template | toy | pass |" in markdown


def test_receipt_describes_machine_and_versions(run_cli):
    _, receipt, _ = run_cli("--engine", "template", "--arch", "toy", "--no-vectors", "--no-cross")
    machine = receipt["machine"]
    assert machine["cpu"]["model"] and machine["cpu"]["cores"] >= 1 and isinstance(machine["cpu"]["flags"], list)
    assert machine["python"] and machine["os"]["platform"] and "gpus" in machine
    assert machine["thaw"]["version"] and len(machine["thaw"]["git_commit"]) == 40
    assert receipt["engines"]["template"]["versions"]["numpy"]
    assert receipt["timings"]["template"]["toy"]["child"]["restore_s"] >= 0
    assert all(r["seconds"] >= 0 for r in receipt["results"])


def test_an_engine_no_driver_answers_to_is_a_usage_error():
    done = subprocess.run([sys.executable, "-m", "thaw_conformance.cli", "--engine", "mine", "--no-vectors"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--engine: no engine 'mine'" in done.stderr and "--driver mine=MODULE:FACTORY" in done.stderr


def test_all_engines_include_the_drivers_given_on_the_command_line_and_skip_those_not_installed(run_cli):
    """Every built-in engine is given a driver whose engine is not installed (an ImportError from inside the
    driver, as `import vllm` raises where vLLM is absent): `--engine all` skips each, saying why, and exits 0."""
    absent = [arg for engine in ("template", "mlx", "vllm", "sglang", "transformers")
              for arg in ("--driver", f"{engine}=broken_drivers:not_installed")]
    status, receipt, _ = run_cli("--driver", "mine=thaw_conformance.template.driver:driver", *absent, "--arch", "toy",
                                 "--no-vectors", "--no-cross")
    assert status == 0 and receipt["engines"]["mine"]["status"].startswith("ran")
    for engine in ("template", "mlx", "vllm", "sglang", "transformers"):
        assert receipt["engines"][engine]["status"] == "not available here: the engine is not installed here"
    skipped = [r for r in receipt["results"] if r["status"] == "skipped"]
    assert len(skipped) == 5 * len(CHECKS) and all("the engine is not installed here" in r["detail"] for r in skipped)


def test_pytest_plugin_runs_the_suite():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                           "thaw_conformance.pytest_plugin", "--pyargs", "thaw_conformance.suite", "--thaw-driver",
                           "template", "--thaw-arch", "toy"], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(CHECKS)} passed" in done.stdout


@pytest.mark.parametrize("args, match", [
    # each ran nothing, listed every check skipped and exited 0
    (["--engine", "vlm"], "no engine 'vlm'"),
    (["--engine", "template", "--arch", "toy,nonexistent"], "--arch: no engine here has 'nonexistent'"),
    (["--engine", "template", "--engine-arch", "template=llama"], "the template driver has no 'llama'"),
    (["--engine", "template", "--engine-arch", "vlm=llama"], "--engine-arch: no engine 'vlm'"),
    (["--engine", "template", "--engine-fork-arch", "vlm=llama"], "--engine-fork-arch: no engine 'vlm'"),
    (["--engine", "template", "--engine-fork-arch", "template=tyo"], "--engine-fork-arch: template runs no 'tyo'"),
    (["--engine", "template", "--arch", "toy", "--fork-arch", "toy,tyo"], "--fork-arch: no engine here runs 'tyo'"),
    (["--engine", "template", "--engine-arch", "toy"], "--engine-arch takes ENGINE=VALUE, got 'toy'"),  # exited 1
    (["--engine", "template", "--python-for", "template=/nonexistent/python"],
     "--python-for: no interpreter at 'template=/nonexistent/python'"),
    (["--engine", "mine", "--driver", "mine=no_such_module:driver"], "--driver mine=no_such_module:driver: no module"),
    (["--engine", "mine", "--driver", "mine=broken_drivers:no_such_factory"], "has no 'no_such_factory'"),
    # an engine named MODULE:FACTORY itself: a KeyError with --arch, without it every check skipped and exit 0
    (["--engine", "no_such_module:driver", "--arch", "toy"], "--engine no_such_module:driver: no module"),
    (["--engine", "no_such_module:driver"], "--engine no_such_module:driver: no module"),
    (["--engine", "broken_drivers:no_such_factory"], "has no 'no_such_factory'"),
    (["--engine", "template", "--timeout", "0"], "must be positive"),
    (["--engine", "template", "all"], "'all' stands alone"),
    (["--engine", "template", "--out", "."], "is a folder"),  # the run ended in IsADirectoryError, no receipt
    (["--engine", "template", "--workdir", sys.executable], "is a file"),  # was a FileExistsError traceback
])
def test_a_misspelt_engine_and_other_bad_options_are_refused_before_anything_runs(tmp_path, args, match):
    out = [] if "--out" in args else ["--out", str(tmp_path / "r.json")]
    workdir = [] if "--workdir" in args else ["--workdir", str(tmp_path / "work")]
    done = subprocess.run([sys.executable, "-m", "thaw_conformance.cli", *args, *out, *workdir], env=_env(),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and match in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_template_aborts_as_the_contract_says():
    """The checks every engine's abort passes (tests/abort_checks.py), on the template an author starts from."""
    engine = ToyThawEngine.start(vocab_size=1024)  # the checks' prompts use ids below 1000
    check_abort(engine, lambda: len(engine.engine.running))


def test_the_template_finish_of_some_requests_loses_none_of_the_others():
    """finish(requests) steps every request in flight: one it was not asked for that finishes meanwhile is
    reported by progress() (it used to vanish), and the ones it returns are not reported again."""
    from thaw_format import SamplingParams

    engine = ToyThawEngine.start(vocab_size=1024)
    long = engine.submit([5, 6, 7], SamplingParams(max_tokens=8, temperature=0.0))
    short = engine.submit([8, 9], SamplingParams(max_tokens=2, temperature=0.0))
    engine.step()
    snapshot = engine.capture(include_weights=False)
    engine.finish()  # restore needs an idle engine
    resumed = engine.restore(snapshot)
    assert sorted(r.request_id for r in resumed) == sorted([long, short])
    done = engine.finish([r for r in resumed if r.request_id == long])
    assert set(done) == {long} and len(done[long].output_token_ids) == 8
    reported = engine.progress()
    assert set(reported) == {short} and reported[short].finished and len(reported[short].token_ids) == 2
    assert engine.finish() == {} and engine.progress() == {}


def test_a_template_capture_does_not_change_as_the_engine_goes_on():
    """The snapshot's request held the engine's own lists: finishing the request after the capture grew the
    captured output (a restore then resumed it from its end)."""
    from thaw_format import SamplingParams

    engine = ToyThawEngine.start(vocab_size=1024)
    engine.submit([5, 6, 7], SamplingParams(max_tokens=8, temperature=0.0))
    engine.step()
    snapshot = engine.capture(include_weights=False)
    (request,) = snapshot.scheduler.requests
    captured = (list(request.output_token_ids), list(request.sampling.extra["logprobs"]))
    engine.finish()
    assert (request.output_token_ids, request.sampling.extra["logprobs"]) == captured
