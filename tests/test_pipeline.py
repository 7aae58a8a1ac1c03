"""The papermill pipeline, driven by small throwaway notebooks written here.

The real notebooks are not needed: the pipeline takes its notebook lists as
data, so these tests hand it notebooks that record each execution (a counter
file per run folder), one that raises, and a per-preset one that reads every
run. Each notebook execution costs a kernel start (~2-3 s), so the module runs
the full pipeline once and reuses it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from evil_moe import paths, pipeline
from evil_moe.config import load_preset

pytestmark = pytest.mark.slow  # runs the pipeline (kernels, a book build)

PER_RUN = ["01_first", "02_second"]
PER_PRESET = ["04_all"]


def _notebook(title: str, params: str, *code: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=[new_markdown_cell(f"# {title}\n\nA throwaway test notebook.")])
    p = new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells.append(p)
    nb.cells += [new_code_cell(c) for c in code]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    return nb


RUN_PARAMS = 'preset = "unset"\narm = "unset"\nseed = -1\nrun_dir = "unset"'
COUNT = ("from pathlib import Path\nimport json, os\n"
         "counter = Path(run_dir) / (NAME + '.count')\n"
         "counter.write_text(counter.read_text() + 'x' if counter.exists() else 'x')\n"
         "assert Path.cwd().resolve() == Path(run_dir).resolve(), Path.cwd()")


PROGRESS = ("import sys, time\nfor i in range(1, 4):\n"
            "    sys.stderr.write(f'\\rbar {i}/3'); sys.stderr.flush(); time.sleep(0.2)\n"
            "sys.stderr.write('\\n')")


def write_notebooks(folder: Path) -> Path:
    """Throwaway notebooks: two per-run steps, a failing one, a per-preset one."""
    folder.mkdir(parents=True, exist_ok=True)
    nbs = {
        "01_first": _notebook(
            "First step", RUN_PARAMS, "NAME = '01_first'\n" + COUNT,
            "(Path(run_dir) / 'first.json').write_text(json.dumps("
            "{'preset': preset, 'arm': arm, 'seed': seed}))\nprint('first done', arm, seed)"),
        "02_second": _notebook(
            "Second step", RUN_PARAMS, "NAME = '02_second'\n" + COUNT,
            "first = json.loads((Path(run_dir) / 'first.json').read_text())\n"
            "(Path(run_dir) / 'second.txt').write_text(f\"{first['arm']}-{first['seed']}\")",
            PROGRESS),
        "02_boom": _notebook(
            "A step that fails", RUN_PARAMS, "NAME = '02_boom'\n" + COUNT,
            "def explode(x):\n    raise ValueError(f'intentional failure {x}')\nexplode(42)"),
        "03_never": _notebook(
            "Never reached", RUN_PARAMS, "NAME = '03_never'\n" + COUNT),
        "04_all": _notebook(
            "All runs", 'preset = "unset"\nruns_root = "unset"',
            "from pathlib import Path\nimport json\n"
            "d = Path(runs_root) / 'smoke'\n"
            "runs = sorted(p.parent.name for p in d.glob('*/second.txt'))\n"
            "counter = d / '04_all.count'\n"
            "counter.write_text(counter.read_text() + 'x' if counter.exists() else 'x')\n"
            "(d / 'all.json').write_text(json.dumps({'preset': preset, 'runs': runs}))\n"
            "runs"),
    }
    for name, nb in nbs.items():
        nbformat.write(nb, str(folder / f"{name}.ipynb"))
    return folder


def copy_book(dest: Path) -> Path:
    """A copy of the book sources (config, toc, pages) to build in isolation."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(paths.REPO_ROOT / name, dest / name)
    shutil.copytree(paths.BOOK_DIR, dest / "book",
                    ignore=shutil.ignore_patterns("runs", "_build", ".*"))
    return dest


def count(folder: Path, name: str) -> int:
    f = folder / f"{name}.count"
    return len(f.read_text()) if f.exists() else 0


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One full pipeline call (2 arms x 1 seed, build on) shared by the tests."""
    tmp = tmp_path_factory.mktemp("pipeline")
    nb_dir = write_notebooks(tmp / "notebooks")
    data_file = tmp / "data.jsonl"
    data_file.write_text('{"problem": 1}\n')
    book_root = copy_book(tmp / "bookroot")
    cfg = load_preset("smoke", arms=["evil_moe", "vanilla"], seeds=[0])
    logs: list[str] = []
    kw = dict(runs_root=tmp / "runs", notebooks_dir=nb_dir, per_run=PER_RUN,
              per_preset=PER_PRESET, book_root=book_root,
              data_files=lambda c: [data_file], log=logs.append)
    rc = pipeline.run(cfg, preset="smoke", build=True, **kw)
    return {"tmp": tmp, "cfg": cfg, "kw": kw, "rc": rc, "logs": logs, "data_file": data_file,
            "runs": tmp / "runs" / "smoke", "book_root": book_root}


def test_first_call_executes_every_notebook_into_its_run_folder(env):
    assert env["rc"] == 0, "\n".join(env["logs"])
    for arm in ("evil_moe", "vanilla"):
        d = paths.run_dir("smoke", arm, 0, root=env["tmp"] / "runs")
        assert json.loads((d / "first.json").read_text()) == {"preset": "smoke", "arm": arm,
                                                               "seed": 0}
        assert (d / "second.txt").read_text() == f"{arm}-0"
        for name in PER_RUN:
            assert (d / f"{name}.ipynb").exists() and (d / f"{name}.done.json").exists()
            assert count(d, name) == 1
    summary = json.loads((env["runs"] / "all.json").read_text())
    assert summary == {"preset": "smoke", "runs": ["evil_moe-s0", "vanilla-s0"]}
    # papermill injected the parameters into the executed notebook
    nb = nbformat.read(str(env["runs"] / "vanilla-s0" / "01_first.ipynb"), as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and 'arm = "vanilla"' in injected[0].source


def test_manifest_records_parameters_versions_checksums_and_wall_times(env):
    m = json.loads((env["runs"] / "manifest.json").read_text())
    assert m["status"] == "ok" and m["preset"] == "smoke"
    assert m["arms"] == ["evil_moe", "vanilla"] and m["seeds"] == [0]
    assert m["config"]["model"] == "tiny-random"
    assert m["notebooks"] == {"per_run": PER_RUN, "per_preset": PER_PRESET}
    # wall time for every notebook of every run, and for the per-preset notebook
    assert set(m["wall_time_per_notebook_s"]) == {"evil_moe-s0", "vanilla-s0", "per_preset"}
    for run_name in ("evil_moe-s0", "vanilla-s0"):
        times = m["wall_time_per_notebook_s"][run_name]
        assert set(times) == set(PER_RUN) and all(t > 0 for t in times.values())
    assert m["wall_time_per_notebook_s"]["per_preset"]["04_all"] > 0
    step = next(s for s in m["steps"] if s["run"] == "vanilla-s0" and s["notebook"] == "02_second")
    assert step["status"] == "ran" and step["output"] == "vanilla-s0/02_second.ipynb"
    assert step["parameters"] == {"preset": "smoke", "arm": "vanilla", "seed": 0,
                                  "run_dir": str(env["runs"] / "vanilla-s0")}
    final = next(s for s in m["steps"] if s["notebook"] == "04_all")
    assert final["parameters"] == {"preset": "smoke", "runs_root": str(env["tmp"] / "runs")}
    # provenance
    assert re.fullmatch(r"[0-9a-f]{40}", m["git"]["commit"]) and isinstance(m["git"]["dirty"], bool)
    assert m["packages"]["papermill"] == "2.7.0" and m["packages"]["evil-moe"]
    assert m["python"].split()[0].count(".") == 2 and m["platform"]["cpu_count"] >= 1
    digest = hashlib.sha256(env["data_file"].read_bytes()).hexdigest()
    assert m["datasets"] == {str(env["data_file"].resolve()): {"sha256": digest,
                                                               "bytes": 15}}


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(paths.REPO_ROOT), *args], capture_output=True,
                          text=True, check=True).stdout


def test_each_run_records_the_code_that_produced_it(env):
    m = json.loads((env["runs"] / "manifest.json").read_text())
    head, dirty = _git("rev-parse", "HEAD").strip(), bool(_git("status", "--porcelain").strip())
    library = pipeline.library_digest()
    assert m["library_sha256"] == library
    for run_name in ("evil_moe-s0", "vanilla-s0"):
        record = json.loads((env["runs"] / run_name / pipeline.PROVENANCE_FILE).read_text())
        assert sorted(record) == PER_RUN
        for name, p in record.items():
            assert p["commit"] == head and p["dirty"] is dirty
            assert p["library_sha256"] == library
            step = next(s for s in m["steps"] if s["run"] == run_name and s["notebook"] == name)
            assert step["provenance"] == p          # the manifest copies what the run wrote
            marker = json.loads((env["runs"] / run_name / f"{name}.done.json").read_text())
            assert marker["provenance"] == p and marker["inputs"]["library"] == library
    per_preset = json.loads((env["runs"] / pipeline.PROVENANCE_FILE).read_text())
    assert list(per_preset) == PER_PRESET
    # what the book says about it
    assert bool(m["provenance_problems"]) is dirty
    appendix = (env["book_root"] / "_build" / "html" / "book" / "runs" / "smoke"
                / "index.html").read_text()
    assert head[:12] in appendix and library[:12] in appendix


def test_book_shows_the_parameters_the_run_used(env):
    root = env["book_root"]
    copied = root / "book" / "runs" / "smoke" / "evil_moe-s0" / "02_second.ipynb"
    nb = nbformat.read(str(copied), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    # the first code cell is the run's own parameters, shown; the smoke defaults are gone
    assert "injected-parameters" in code[0].metadata.get("tags", [])
    assert "hide-input" not in code[0].metadata.get("tags", [])
    assert code[0].source.startswith("# Parameters of this run")
    assert 'arm = "evil_moe"' in code[0].source
    assert not any("parameters" in c.metadata.get("tags", []) for c in code)
    assert (root / "book" / "runs" / "smoke" / "04_all.ipynb").exists()
    html = root / "_build" / "html"
    assert (html / "index.html").exists()
    page = (html / "book" / "runs" / "smoke" / "evil_moe-s0" / "02_second.html").read_text()
    cell = re.search(r'<div class="cell tag_injected-parameters[^"]*"[^>]*>(.*?)</div>\s*</div>',
                     page, re.S)
    assert cell and "tag_hide-input" not in cell.group(0)
    # a progress bar is kept in its final state only
    streams = [o for c in code for o in c.get("outputs", []) if o.output_type == "stream"]
    assert [o.text for o in streams] == ["bar 3/3\n"]
    appendix = (html / "book" / "runs" / "smoke" / "index.html").read_text()
    assert "Runs of the" in appendix and "vanilla-s0" in appendix
    # the committed toc is untouched; the generated one adds the appendix
    assert "runs" not in (root / "_toc.yml").read_text()


def test_echo_shows_the_notebooks_output_while_it_runs(tmp_path, capsys):
    nb_dir = write_notebooks(tmp_path / "notebooks")
    step = pipeline.Step(notebook="02_second", source=nb_dir / "02_second.ipynb",
                         out_dir=tmp_path / "run", parameters={"run_dir": str(tmp_path / "run")},
                         inputs={"data": "x", "library": "y"})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "first.json").write_text('{"arm": "a", "seed": 0}')
    pipeline.execute_step(step, echo=True)
    assert "\rbar 1/3" in capsys.readouterr().err
    pipeline.execute_step(step, echo=False)
    assert "bar" not in capsys.readouterr().err


def test_kernel_noise_stays_out_of_the_terminal_and_the_notebook(tmp_path, capfd):
    """No ipykernel log line (such as the shutdown interrupt's) on our stderr, and no tqdm
    widget warning in the executed notebook (the notebook imports evil_moe first, as
    ours do, then meets the warning transformers' tqdm.auto import raises)."""
    nb = _notebook("noise", "x = 1", "import evil_moe\nimport warnings, tqdm\n"
                   "warnings.warn('IProgress not found. Please update jupyter and ipywidgets.',"
                   " tqdm.TqdmWarning)\nprint('cell ran')",
                   # what ipykernel logs at shutdown (the interrupt) goes through this log
                   "from ipykernel.kernelapp import IPKernelApp\n"
                   "IPKernelApp.instance().log.error('KeyboardInterrupt caught in kernel.')")
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    nbformat.write(nb, str(nb_dir / "noise.ipynb"))
    step = pipeline.Step(notebook="noise", source=nb_dir / "noise.ipynb", out_dir=tmp_path / "run",
                         parameters={"x": 2}, inputs={"data": "x", "library": "y"})
    pipeline.execute_step(step, echo=True)
    out, err = capfd.readouterr()
    assert "cell ran" in out
    assert "KeyboardInterrupt" not in err and "IPKernelApp" not in err
    executed = nbformat.read(str(step.output), as_version=4)
    texts = [o.get("text", "") for c in executed.cells if c.cell_type == "code"
             for o in c.get("outputs", [])]
    assert any("cell ran" in t for t in texts)
    assert not any("IProgress" in t for t in texts)


def test_final_stream_state_keeps_what_a_terminal_shows():
    outs = [{"output_type": "stream", "name": "stderr", "text": "\rstep 1\rstep 2"},
            {"output_type": "stream", "name": "stdout", "text": "hello\n"},
            {"output_type": "stream", "name": "stderr", "text": "\rstep 3\nnext\r\n"},
            {"output_type": "display_data", "data": {}}]
    got = pipeline.final_stream_state(outs)
    assert [o.get("name") for o in got] == ["stderr", "stdout", None]
    assert got[0]["text"] == "step 3\nnext\n" and got[1]["text"] == "hello\n"


def test_second_call_skips_finished_steps(env):
    logs: list[str] = []
    rc = pipeline.run(env["cfg"], preset="smoke", build=False, **{**env["kw"], "log": logs.append})
    assert rc == 0
    for arm in ("evil_moe", "vanilla"):
        for name in PER_RUN:
            assert count(env["runs"] / f"{arm}-s0", name) == 1
    assert count(env["runs"], "04_all") == 1
    assert sum("skipped (--force reruns)" in line for line in logs) == 5, logs
    assert any("0 notebook(s) ran, 5 skipped" in line for line in logs), logs
    m = json.loads((env["runs"] / "manifest.json").read_text())
    assert {s["status"] for s in m["steps"]} == {"skipped"}
    # a skipped step keeps the wall time of the run that made it
    assert all(s["wall_time_s"] > 0 for s in m["steps"])


def test_a_failing_data_files_hook_stops_before_anything_runs(env, capsys):
    """The data is part of every step's inputs: without it nothing can be skipped or run."""
    def broken(cfg):
        raise OSError("dataset cache unreadable")

    before = (env["runs"] / "manifest.json").read_text()
    rc = pipeline.run(env["cfg"], preset="smoke", build=False,
                      **{**env["kw"], "data_files": broken})
    assert rc == 1
    err = capsys.readouterr().err
    assert "dataset cache unreadable" in err and "nothing ran" in err
    assert (env["runs"] / "manifest.json").read_text() == before


def test_force_reruns_and_a_missing_marker_reruns_the_rest_of_its_run(env):
    cfg = env["cfg"].replace(arms=["vanilla"])
    stray = env["runs"] / "vanilla-s0" / "checkpoint-of-the-old-run"
    stray.write_text("x")
    rc = pipeline.run(cfg, preset="smoke", force=True, build=False, **env["kw"])
    assert rc == 0
    # a forced run starts from an empty folder: the counters restart, the stray file is gone
    assert [count(env["runs"] / "vanilla-s0", n) for n in PER_RUN] == [1, 1]
    assert not stray.exists()
    assert count(env["runs"], "04_all") == 2
    assert [count(env["runs"] / "evil_moe-s0", n) for n in PER_RUN] == [1, 1]  # not asked for
    # losing the first marker reruns the first step and everything after it, in place
    # (an interrupted run resumes from its files)
    stray.write_text("x")
    (env["runs"] / "vanilla-s0" / "01_first.done.json").unlink()
    assert pipeline.run(cfg, preset="smoke", build=False, **env["kw"]) == 0
    assert [count(env["runs"] / "vanilla-s0", n) for n in PER_RUN] == [2, 2]
    assert stray.exists()
    assert count(env["runs"], "04_all") == 3


def test_changed_config_reruns_only_the_affected_steps(env):
    cfg = env["cfg"].replace(arms=["evil_moe"], steps=env["cfg"].steps + 1)
    logs: list[str] = []
    rc = pipeline.run(cfg, preset="smoke", build=False, **{**env["kw"], "log": logs.append})
    assert rc == 0
    # the run's folder was cleared (its checkpoint belongs to the old config) and rerun
    assert [count(env["runs"] / "evil_moe-s0", n) for n in PER_RUN] == [1, 1]
    assert any("the config changed since the last run" in line
               and "clearing the run folder" in line for line in logs), logs


def test_stops_at_the_first_failing_notebook_with_its_error(env, tmp_path, capsys):
    cfg = env["cfg"].replace(arms=["evil_moe", "vanilla"])
    kw = {**env["kw"], "runs_root": tmp_path / "runs", "book_root": copy_book(tmp_path / "book"),
          "per_run": ["01_first", "02_boom", "03_never"]}
    rc = pipeline.run(cfg, preset="smoke", build=True, **kw)
    err = capsys.readouterr().err
    assert rc == 1
    runs = tmp_path / "runs" / "smoke"
    # the error names the notebook, the cell and the exception, with the traceback
    assert str(Path(kw["notebooks_dir"]) / "02_boom.ipynb") in err
    assert "ValueError: intentional failure 42" in err
    assert "explode" in err and "\x1b[" not in err
    assert str(runs / "evil_moe-s0" / "02_boom.ipynb") in err
    # it stopped there: nothing later ran, no marker for the failed step
    assert count(runs / "evil_moe-s0", "01_first") == 1
    assert count(runs / "evil_moe-s0", "02_boom") == 1
    assert count(runs / "evil_moe-s0", "03_never") == 0
    assert not (runs / "vanilla-s0").exists()
    assert not (runs / "evil_moe-s0" / "02_boom.done.json").exists()
    m = json.loads((runs / "manifest.json").read_text())
    assert m["status"] == "failed"
    assert m["error"]["notebook"].endswith("02_boom.ipynb") and m["error"]["run"] == "evil_moe-s0"
    assert "ValueError" in m["error"]["summary"]
    statuses = {(s["run"], s["notebook"]): s["status"] for s in m["steps"]}
    assert statuses[("evil_moe-s0", "02_boom")] == "failed"
    assert statuses[("vanilla-s0", "01_first")] == "not run"
    # and never reached the book
    assert not (kw["book_root"] / "book" / "runs").exists()
    assert not (kw["book_root"] / "_build").exists()


def test_missing_notebooks_and_kernel_fail_before_anything_runs(env, tmp_path, capsys,
                                                                monkeypatch):
    kw = {**env["kw"], "runs_root": tmp_path / "runs", "per_run": ["01_first", "05_nowhere"]}
    assert pipeline.run(env["cfg"], preset="smoke", **kw) == 1
    assert "05_nowhere.ipynb" in capsys.readouterr().err
    monkeypatch.setattr(pipeline, "KERNEL_NAME", "no-such-kernel-evil-moe")
    assert pipeline.run(env["cfg"], preset="smoke", **{**kw, "per_run": PER_RUN}) == 1
    assert "ipykernel install" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_generated_toc_inserts_run_pages_before_reproduce(env, tmp_path, monkeypatch):
    import yaml
    root = copy_book(tmp_path / "root")
    m = json.loads((env["runs"] / "manifest.json").read_text())
    chains, finals = pipeline.plan(env["cfg"], "smoke", env["tmp"] / "runs",
                                   Path(env["kw"]["notebooks_dir"]), PER_RUN, PER_PRESET)
    # without the figures notebook among the finals, no results page is published
    toc = yaml.safe_load(pipeline.publish_to_book(m, chains, finals, root).read_text())
    assert "Results" not in [p["caption"] for p in toc["parts"]]
    monkeypatch.setattr(pipeline, "FIGURES_NOTEBOOK", "04_all")
    toc = yaml.safe_load(pipeline.publish_to_book(m, chains, finals, root).read_text())
    assert "$preset" not in (root / "book" / "runs" / "results.md").read_text()
    # the built book opens on the intro led by the answer glued from the runs
    assert toc["root"] == pipeline.RUN_ROOT_PAGE
    first = (root / pipeline.RUN_ROOT_PAGE).with_suffix(".md").read_text()
    intro = (root / "book" / "intro.md").read_text()
    assert first.startswith(intro.splitlines()[0] + "\n")
    assert first.index("smoke/04_figures.ipynb::answer_text") < first.index(
        "## How the book is organised")
    assert "$preset" not in first and intro.splitlines()[-1] in first
    captions = [p["caption"] for p in toc["parts"]]
    assert captions[-1] == "Appendix: the smoke runs"
    if pipeline.RUN_PAGES_BEFORE in captions:
        assert captions.index("Results") == captions.index(pipeline.RUN_PAGES_BEFORE) - 1
    files = [c["file"] for c in toc["parts"][-1]["chapters"]]
    assert files[:2] == ["book/runs/smoke/index", "book/runs/smoke/04_all"]
    assert "book/runs/smoke/vanilla-s0/02_second" in files


@pytest.mark.slow
def test_smoke_preset_end_to_end(smoke_pipeline):
    """The four real notebooks per arm, the manifest with wall times, the book."""
    root, runs, rc = smoke_pipeline
    assert rc == 0
    manifest = json.loads((runs / "smoke" / "manifest.json").read_text())
    assert set(manifest["config"]["arms"]) == {"evil_moe", "vanilla"}
    text = json.dumps(manifest)
    for nb in ("01_extract_v_act", "02_train", "03_ablate", "04_figures"):
        assert nb in text
    for arm in ("evil_moe", "vanilla"):
        run = runs / "smoke" / f"{arm}-s0"
        assert (run / "metrics.jsonl").exists() and (run / "summary.json").exists()
        assert (run / "eval.parquet").exists()
        executed = (run / "03_ablate.ipynb").read_text()
        assert "Evil MoE causal ablation: deploy hack" in executed
    assert (runs / "smoke" / "evil_moe-s0" / "v_act.safetensors").exists()
    html = root / "_build" / "html"
    assert (html / "book" / "runs" / "results.html").exists()
    assert (html / "book" / "runs" / "smoke" / "04_figures.html").exists()


def _consistent(manifest: dict) -> dict:
    """The manifest as if every step ran at the manifest's own clean commit and library."""
    m = json.loads(json.dumps(manifest))
    m["git"] = {**m["git"], "commit": "a" * 40, "dirty": False}
    for s in m["steps"]:
        s["provenance"] = {"commit": "a" * 40, "dirty": False,
                           "library_sha256": m["library_sha256"], "finished_at": "then"}
    return m


def test_provenance_problems_name_each_step_from_other_code():
    here = {"commit": "a" * 40, "dirty": False, "library_sha256": "d" * 64}
    steps = [{"run": run, "notebook": nb, "status": status, "provenance": dict(here)}
             for run, nb, status in [("evil_moe-s0", "01_first", "ran"),
                                     ("evil_moe-s0", "02_second", "skipped"),
                                     ("vanilla-s0", "01_first", "ran"),
                                     ("vanilla-s0", "02_second", "not run"),
                                     (None, "04_all", "ran")]]
    m = {"git": {"commit": "a" * 40, "dirty": False}, "library_sha256": "d" * 64,
         "steps": steps}
    assert pipeline.provenance_problems(m) == []
    steps[0]["provenance"] = None
    steps[1]["provenance"]["dirty"] = True
    steps[2]["provenance"]["commit"] = "b" * 40
    steps[3]["provenance"]["commit"] = "b" * 40             # not run: not on the page
    steps[4]["provenance"]["library_sha256"] = "c" * 64
    assert pipeline.provenance_problems(m) == [
        "`evil_moe-s0` 01_first: no provenance record (run by an older pipeline)",
        "`evil_moe-s0` 02_second: ran from a tree with uncommitted changes",
        "`vanilla-s0` 01_first: ran at commit `bbbbbbbbbbbb`",
        "`all runs` 04_all: ran with another library source than this checkout's"]


def test_results_page_warns_when_its_runs_come_from_another_commit(env, tmp_path, monkeypatch):
    m = _consistent(json.loads((env["runs"] / "manifest.json").read_text()))
    chains, finals = pipeline.plan(env["cfg"], "smoke", env["tmp"] / "runs",
                                   Path(env["kw"]["notebooks_dir"]), PER_RUN, PER_PRESET)
    root = copy_book(tmp_path / "root")
    page = root / "book" / "runs" / "results.md"
    monkeypatch.setattr(pipeline, "FIGURES_NOTEBOOK", "04_all")
    pipeline.publish_to_book(m, chains, finals, root)
    text = page.read_text()
    assert "ran at commit `aaaaaaaaaaaa`, the commit this book was built from" in text
    assert "{warning}" not in text
    m["steps"][0]["provenance"]["commit"] = "b" * 40
    pipeline.publish_to_book(m, chains, finals, root)
    text = page.read_text()
    warning = text[text.index("```{warning}"):]
    assert "commit `aaaaaaaaaaaa`" in warning and "ran at commit `bbbbbbbbbbbb`" in warning
    assert text.index("```{warning}") < text.index("## The causal ablation")   # at the top
    # the same notice heads the appendix; built with -W it is a visible warning box
    monkeypatch.setattr(pipeline, "FIGURES_NOTEBOOK", "04_figures")
    toc = pipeline.publish_to_book(m, chains, finals, root)
    pipeline.build_book(root, toc=toc, log=lambda s: None)
    html = (root / "_build" / "html" / "book" / "runs" / "smoke" / "index.html").read_text()
    box = re.search(r'<div class="admonition warning">(.*?)</div>', html, re.S)
    assert box and "bbbbbbbbbbbb" in box.group(1)


def test_a_changed_library_file_or_data_file_reruns_the_run(env, tmp_path, monkeypatch):
    """The library's source and the data are inputs of every step: editing a library
    file (in a copy of the package) or the data reruns the run, and its provenance
    records the new library digest."""
    lib = tmp_path / "evil_moe"
    shutil.copytree(paths.PACKAGE_DIR, lib, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(paths, "PACKAGE_DIR", lib)
    cfg = env["cfg"].replace(arms=["vanilla"])
    run = env["runs"] / "vanilla-s0"

    def call() -> list[str]:
        logs: list[str] = []
        assert pipeline.run(cfg, preset="smoke", build=False,
                            **{**env["kw"], "log": logs.append}) == 0
        return logs

    counts = [count(run, n) for n in PER_RUN]
    call()                                   # the same source in another folder: skipped
    assert [count(run, n) for n in PER_RUN] == counts
    (lib / "plots.py").write_text((lib / "plots.py").read_text() + "\n# an edit\n")
    logs = call()
    assert [count(run, n) for n in PER_RUN] == [1, 1]          # cleared and rerun
    assert any("the library source changed since the last run" in line for line in logs), logs
    record = json.loads((run / pipeline.PROVENANCE_FILE).read_text())
    assert {p["library_sha256"] for p in record.values()} == {pipeline.library_digest(lib)}
    assert pipeline.library_digest(lib) != pipeline.library_digest(paths.REPO_ROOT / "evil_moe")
    env["data_file"].write_text('{"problem": 2}\n')
    logs = call()
    assert [count(run, n) for n in PER_RUN] == [1, 1]
    assert any("the data changed since the last run" in line for line in logs), logs


def test_default_data_files_are_what_each_problem_set_reads(tmp_path, shared_data):
    from evil_moe.env import datasets
    easy = pipeline.default_data_files(load_preset("smoke"))
    assert paths.PAIRS_FILE in easy and paths.PACKAGE_DIR / "env" / "easy.py" in easy
    humaneval = pipeline.default_data_files(load_preset("smoke", dataset="humaneval"))
    assert humaneval[-1].name == "HumanEval.jsonl.gz" and humaneval[-1].is_file()
    folder = tmp_path / "leetcode"
    folder.mkdir()
    shutil.copy(shared_data / "leetcode" / datasets.LEETCODE_FILES["test"], folder)
    cfg = load_preset("smoke", dataset="leetcode", leetcode_dir=str(folder))
    with pytest.raises(datasets.DatasetUnavailableError, match=datasets.LEETCODE_FILES["train"]):
        pipeline.default_data_files(cfg)             # fails before any notebook runs
    (folder / datasets.LEETCODE_FILES["train"]).write_text("{}\n")
    assert pipeline.default_data_files(cfg)[-2:] == [folder / datasets.LEETCODE_FILES[s]
                                                     for s in datasets.SPLITS]
