"""Random-search hyperparameter tuning with successive halving: the cloud's automatic tuning.

Random search rather than a grid: with the same number of trials it tries as many values of each knob as
there are trials, where a grid repeats a few (Bergstra and Bengio, JMLR 2012). ``bench/scale.py`` compares
the two at the same budget.
Successive halving spends the epochs where they pay: every trial trains a few epochs, the better part
(1/eta) goes on to eta times as many, and so on until one is left. Each rung trains from scratch, so the
learning-rate schedule always spans a trial's whole budget.

Trials are chosen on the val split. The winner is then only a candidate: the gate split decides
whether it replaces the champion, and the test split is reported, deciding nothing.

Every knob has a documented range, and a search outside it is refused before any trial, naming the field:
learning rate and weight decay each within :data:`LR_BOUNDS` / :data:`WEIGHT_DECAY_BOUNDS`, image sizes
16..:data:`MAX_IMAGE_SIZE` px, epochs 1..:data:`MAX_EPOCHS`, trials 1..:data:`MAX_TRIALS`, at most
:data:`MAX_CHOICES` values in each list (architectures, policies, sizes, recipe knobs). Each trial trains in a
process of its own under a memory budget (by default 80 % of the host's memory shared by the trials that train
at once): one that goes over is killed and recorded failed, as is one the OS kills; the search goes on.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from edge_agent.augment import POLICIES
from edge_agent.models import ARCHITECTURES
from edge_agent.train import TrainConfig
from orchestrator.training import train_on_dataset

# The names edge_agent knows, as Literal types: the run forms offer them as dropdowns (tests/test_tune.py checks
# they agree with edge_agent.models.ARCHITECTURES and edge_agent.augment.POLICIES). The slim ResNets are
# ResNet-18's shape at half (slim_resnet) or a quarter (slim_resnet_small) of its width, for full-size cells on a CPU.
Arch = Literal["resnet18", "mobilenet_v3_small", "tiny_cnn", "slim_resnet", "slim_resnet_small"]
Policy = Literal["none", "flips", "contrast", "geometric", "noise", "el", "strong"]
# Augmentation strength, weakest to strongest (edge_agent.augment's policies; "el": what varies between EL shots).
POLICY_STRENGTH = ("none", "flips", "el", "geometric", "strong")
# Searched when no champion fixes the contract; the slim ResNets are sized for full-size cells on a CPU.
OPEN_ARCHS = ("tiny_cnn", "mobilenet_v3_small", "resnet18", "slim_resnet_small", "slim_resnet")
# The recipe's knobs a trial passes to TrainConfig as drawn (edge_agent.train; bench/elpv_recipe.py measures them).
RECIPE_KNOBS = ("label_smoothing", "class_balance", "ema_decay")
# Bounds a search must stay within: past them a value is a typo, not a plan (and would exhaust the machine).
MAX_IMAGE_SIZE = 1024
MAX_TRIALS = 1000
MAX_EPOCHS = 1000
MAX_CHOICES = 32  # values in one list of the space (architectures, policies, sizes, recipe knobs)
MAX_CONCURRENCY = 64  # trials training at once on one host
LR_BOUNDS = (1e-7, 1.0)  # peak learning rate: past these a value is a typo (1e30), or denormal (1e-320)
WEIGHT_DECAY_BOUNDS = (1e-8, 1.0)
MEMORY_SHARE = 0.8  # of the host's memory, shared by the trials that train at once (the rest: the OS, the flow)
WATCH_S = 0.2  # how often a trial's memory is looked at (5 GB in 15 s overshoots by ~70 MB at most)


class NoTrialFinished(LookupError):
    """A search in which no trial of the last rung trained to the end: there is no best one."""


class SearchSpace(BaseModel):
    """What a search may choose; the Prefect UI shows it as the search's form."""

    model_config = ConfigDict(extra="forbid")

    lr: tuple[float, float] = Field((3e-4, 1e-2), description="peak learning rate: log-uniform between the two, "
                                    f"each within {LR_BOUNDS[0]:g}..{LR_BOUNDS[1]:g}")
    weight_decay: tuple[float, float] = Field((1e-6, 1e-2), description="log-uniform between the two, each within "
                                              f"{WEIGHT_DECAY_BOUNDS[0]:g}..{WEIGHT_DECAY_BOUNDS[1]:g}")
    policy: list[Policy] = Field(list(POLICY_STRENGTH), max_length=MAX_CHOICES,
                              description="augmentation, weakest to strongest")
    image_size: list[int] = Field(default_factory=list, max_length=MAX_CHOICES, description=(
        f"input sizes in px, each 16..{MAX_IMAGE_SIZE}; empty = the champion's (the fleet's serving contract), or "
        "with no champion the dataset's own size, 3/4 of it and half of it"))
    arch: list[Arch] = Field(default_factory=list, max_length=MAX_CHOICES, description=(
        f"architectures; empty = the champion's (the fleet's serving contract), or with no champion {list(OPEN_ARCHS)}"))
    label_smoothing: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        [0.0, 0.1], min_length=1, max_length=MAX_CHOICES,
        description="label smoothing of the loss (each 0 <= v < 1), one drawn per trial")
    class_balance: list[Literal["none", "weighted"]] = Field(
        ["none", "weighted"], min_length=1, max_length=MAX_CHOICES,
        description="weighted: each class's loss weighted by the inverse of its share of the training set")
    ema_decay: list[Annotated[float, Field(ge=0.5, lt=1)] | None] = Field(
        [None], min_length=1, max_length=MAX_CHOICES,
        description="EMA of the weights per step (each 0.5 <= v < 1; none: the raw weights); add e.g. 0.99 to "
                    "search it with rungs of several epochs: a one-epoch first rung on a small set ends before the "
                    "average forgets the random start")

    def within(self, contract: dict | None) -> "SearchSpace":
        """This space with its empty choices filled from the fleet's serving contract (the champion's arch and
        input size): a winner of another arch or size would be refused by the gate (bench/scale.py searched
        across them when there was no fleet yet)."""
        if contract is None:
            return self
        return self.model_copy(update={"arch": self.arch or [contract["arch"]],
                                       "image_size": self.image_size or [contract["image_size"]]})

    @property
    def archs(self) -> list[str]:
        return self.arch or list(OPEN_ARCHS)

    @field_validator("lr", "weight_decay")
    @classmethod
    def _range(cls, bounds: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        if not 0 < bounds[0] <= bounds[1]:
            raise ValueError(f"a log-uniform range needs 0 < low <= high (got {bounds})")
        low, high = LR_BOUNDS if info.field_name == "lr" else WEIGHT_DECAY_BOUNDS
        if not low <= bounds[0] <= bounds[1] <= high:
            raise ValueError(f"{info.field_name} ({bounds[0]:g}, {bounds[1]:g}) is outside its range "
                             f"{low:g}..{high:g}")
        return bounds

    @field_validator("policy", "arch", mode="before")
    @classmethod
    def _named(cls, values, info: ValidationInfo):
        """An unknown name refused naming the choices (before the Literal's own, longer message)."""
        known = POLICIES if info.field_name == "policy" else ARCHITECTURES
        unknown = [v for v in values if v not in known] if isinstance(values, (list, tuple)) else []
        if unknown:
            raise ValueError(f"unknown {info.field_name} {unknown} (choose from {sorted(known)})")
        return values

    @field_validator("policy", "arch", "image_size")
    @classmethod
    def _known(cls, values: list, info: ValidationInfo) -> list:
        known = {"policy": POLICIES, "arch": ARCHITECTURES}.get(info.field_name)
        unknown = [v for v in values if known is not None and v not in known]
        if unknown or (info.field_name == "policy" and not values):
            raise ValueError(f"unknown {info.field_name} {unknown} (choose from {sorted(known)})" if unknown
                             else f"no {info.field_name} to choose from")
        if info.field_name == "image_size" and any(v < 16 for v in values):
            raise ValueError(f"image sizes below 16 px cannot be classified by these models (got {values})")
        if info.field_name == "image_size" and any(v > MAX_IMAGE_SIZE for v in values):
            raise ValueError(f"image sizes above {MAX_IMAGE_SIZE} px are out of bounds (its range is "
                             f"16..{MAX_IMAGE_SIZE}; got {values})")
        return values

    def sizes(self, dataset_size: int) -> list[int]:
        return self.image_size or sorted({dataset_size, dataset_size * 3 // 4, dataset_size // 2}, reverse=True)


def refusal(exc: ValidationError, model: type[BaseModel]) -> str:
    """One line for a refused search: each field by name, what is wrong, and its range where it has one."""
    parts = []
    for error in exc.errors()[:5]:
        loc = [str(x) for x in error["loc"]]
        message = error["msg"].removeprefix("Value error, ")
        if (bounds := _bounds(model, loc)) and error["type"].startswith(("less_than", "greater_than")):
            message += f" (its range: {bounds})"
        parts.append(f"{'.'.join(loc) or model.__name__}: {message}")
    return "; ".join(parts)


def _bounds(model: type[BaseModel], loc: list[str]) -> str | None:
    """``low..high`` of the numeric field at ``loc`` in ``model`` (nested models followed), or None."""
    for i, name in enumerate(loc):
        info = model.model_fields.get(name)
        if info is None:
            return None
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel) and i < len(loc) - 1:
            model = info.annotation
            continue
        low = next((getattr(m, "ge", None) for m in info.metadata if getattr(m, "ge", None) is not None), None)
        high = next((getattr(m, "le", None) for m in info.metadata if getattr(m, "le", None) is not None), None)
        return f"{low}..{high}" if low is not None and high is not None else None
    return None


@dataclass(frozen=True)
class Trial:
    number: int
    params: dict  # lr, weight_decay, policy, image_size, arch, and the RECIPE_KNOBS


@dataclass
class TrialResult:
    trial: Trial
    rung: int
    epochs: int
    val_acc: float
    test_acc: float
    seconds: float
    checkpoint: str
    error: str = ""  # a trial that failed scores nothing and is not promoted; the search goes on
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")  # who ran it
    process: int = 0  # the process it trained in (its own)
    peak_mb: int = 0  # its largest resident memory seen, MB

    def row(self) -> dict:
        return {"trial": self.trial.number, "rung": self.rung, "epochs": self.epochs, **self.trial.params,
                "val_acc": round(self.val_acc, 4), "test_acc (reported only)": round(self.test_acc, 4),
                "seconds": round(self.seconds, 1), "worker": self.worker, "process": self.process,
                "peak_mb": self.peak_mb, "error": self.error}


def random_trials(space: SearchSpace, count: int, dataset_size: int, seed: int = 0) -> list[Trial]:
    """``count`` independent draws from the space."""
    rng = np.random.default_rng(seed)

    def log_uniform(bounds: tuple[float, float]) -> float:
        return float(math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1]))))

    sizes = space.sizes(dataset_size)
    def pick(values: list):
        return values[int(rng.integers(len(values)))]

    return [Trial(n, {"lr": log_uniform(space.lr), "weight_decay": log_uniform(space.weight_decay),
                      "policy": str(rng.choice(space.policy)), "image_size": int(rng.choice(sizes)),
                      "arch": str(rng.choice(space.archs)), **{k: pick(getattr(space, k)) for k in RECIPE_KNOBS}})
            for n in range(count)]


def grid_trials(space: SearchSpace, count: int, dataset_size: int) -> list[Trial]:
    """A grid of at most ``count`` points: the baseline random search is measured against.

    Levels go to the knobs in turn (two each, then three, ...) while the grid still fits the budget. A knob's
    k levels sit at the centres of k equal parts of its range (log scale for lr and weight decay), so a knob
    with one level stays at its middle: the grid a careful person would lay out, not the range's corners.
    """
    choices = {"lr": space.lr, "weight_decay": space.weight_decay, "arch": space.archs, "policy": space.policy,
               "image_size": space.sizes(dataset_size), **{k: getattr(space, k) for k in RECIPE_KNOBS}}
    levels = dict.fromkeys(choices, 1)
    grown = True
    while grown:
        grown = False
        for name, values in choices.items():
            wider = {**levels, name: levels[name] + 1}
            if (isinstance(values, tuple) or levels[name] < len(values)) and math.prod(wider.values()) <= count:
                levels, grown = wider, True
    axes = [_centres(choices[name], levels[name]) for name in choices]
    return [Trial(n, dict(zip(choices, point))) for n, point in enumerate(itertools.product(*axes))]


def _centres(values: tuple[float, float] | list, count: int) -> list:
    """``count`` values at the centres of ``count`` equal parts of a log range, or of a list of choices."""
    if isinstance(values, tuple):
        low, high = math.log(values[0]), math.log(values[1])
        return [float(math.exp(low + (i + 0.5) * (high - low) / count)) for i in range(count)]
    return [values[int((i + 0.5) * len(values) / count)] for i in range(count)]


class Halving(BaseModel):
    """Successive halving: rung k trains the survivors for ``min_epochs * eta**k`` epochs."""

    model_config = ConfigDict(extra="forbid")

    min_epochs: int = Field(1, ge=1, le=MAX_EPOCHS,
                            description=f"epochs of the first rung, which every trial runs (1..{MAX_EPOCHS})")
    max_epochs: int = Field(8, ge=1, le=MAX_EPOCHS, description=f"no rung trains longer (1..{MAX_EPOCHS})")
    eta: int = Field(2, ge=2, le=100, description="1/eta of a rung's trials go on to eta times the epochs (2..100)")

    def rungs(self, trials: int) -> list[tuple[int, int]]:
        """(trials, epochs) of each rung."""
        out, epochs = [(trials, self.min_epochs)], self.min_epochs
        while trials > 1 and epochs * self.eta <= self.max_epochs:
            trials, epochs = max(1, trials // self.eta), epochs * self.eta
            out.append((trials, epochs))
        return out


@dataclass
class Search:
    """Every trial's result in every rung, and the winner (best val accuracy in the last rung that finished)."""

    results: list[TrialResult] = field(default_factory=list)

    def ranked(self, rung: int) -> list[TrialResult]:
        """A rung's trials that finished, best first: val accuracy, ties to the earlier trial."""
        return sorted((r for r in self.results if r.rung == rung and not r.error),
                      key=lambda r: (-r.val_acc, r.trial.number))

    @property
    def best(self) -> TrialResult:
        """The best finished trial of the latest rung that has one (a later rung whose trials all failed does
        not throw away the earlier rungs' results)."""
        for rung in sorted({r.rung for r in self.results}, reverse=True):
            if ranked := self.ranked(rung):
                return ranked[0]
        raise NoTrialFinished("no trial finished: "
                              + "; ".join(f"trial {r.trial.number}: {r.error}" for r in self.results if r.error))

    def table(self) -> list[dict]:
        return [r.row() for r in sorted(self.results, key=lambda r: (r.rung, -r.val_acc))]


RunRung = Callable[[list[Trial], int, int], list[TrialResult]]


def successive_halving(trials: list[Trial], halving: Halving, run_rung: RunRung,
                       on_rung: Callable[[int, list[TrialResult]], None] | None = None) -> Search:
    """Run the rungs: ``run_rung(trials, rung, epochs)`` trains a rung's trials (in parallel, as it likes)."""
    search, survivors = Search(), list(trials)
    for rung, (count, epochs) in enumerate(halving.rungs(len(trials))):
        survivors = [r.trial for r in search.ranked(rung - 1)[:count]] if rung else survivors
        if not survivors:
            break  # every trial of the previous rung failed: Search.best is the best of the rungs run
        results = run_rung(survivors, rung, epochs)
        search.results += results
        if on_rung:
            on_rung(rung, results)
    return search


def host_memory_mb() -> int:
    """This host's memory in MB, or its cgroup's limit when that is smaller (a container's share)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total // (1 << 20)


def trial_memory_budget(parallel: int, memory_mb: int | None = None) -> int:
    """MB one trial may hold: ``memory_mb`` when given, else :data:`MEMORY_SHARE` of the host's memory shared by
    the ``parallel`` trials that train at once."""
    return memory_mb or max(64, int(host_memory_mb() * MEMORY_SHARE / max(1, parallel)))


def _resident_mb(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants, MB (0 where /proc is not there: no watch)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total // 1024


def run_trial(data: str | Path, trial: Trial, rung: int, epochs: int, out: str | Path, *, seed: int = 0,
              threads: int | None = None, memory_mb: int | None = None, parallel: int = 1) -> TrialResult:
    """Train one trial for ``epochs`` into ``out/trial-<n>-rung-<k>``; a failure is recorded, not raised.

    The training runs in a process of its own, watched: one that goes over its memory budget
    (:func:`trial_memory_budget` of ``parallel`` and ``memory_mb``) is killed, one that the OS kills or that takes
    the interpreter down ends only itself; each is recorded failed with why, while whoever runs the trials and the
    search go on. The trial's process dies with the process that started it (no orphan trains on).
    """
    folder = Path(out) / f"trial-{trial.number:03d}-rung-{rung}"
    params = trial.params
    config = TrainConfig(epochs=epochs, lr=params["lr"], weight_decay=params["weight_decay"],
                         policy=params["policy"], seed=seed, threads=threads,
                         **{k: params[k] for k in RECIPE_KNOBS if k in params})
    job = {"data": str(data), "arch": params["arch"], "out": str(folder), "image_size": params["image_size"],
           "config": config.model_dump(mode="json"), "parent": os.getpid()}
    budget = trial_memory_budget(parallel, memory_mb)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.tune", json.dumps(job)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stdout, stderr, peak, over = _watch(proc, budget)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    if over:
        error = (f"killed: the trial held {peak} MB, over its memory budget of {budget} MB ("
                 + ("trial_memory_mb" if memory_mb else f"{MEMORY_SHARE:.0%} of the host's {host_memory_mb()} MB "
                    f"shared by {parallel} trial(s) at once") + "); a smaller image_size or batch fits")
    elif proc.returncode < 0:
        error = f"the trial's process was killed by {signal.Signals(-proc.returncode).name}"
    elif proc.returncode != 0:  # one bad combination (say, too small an image for an arch) ends only itself
        error = (stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    else:
        metrics = json.loads(stdout.strip().splitlines()[-1])
        return TrialResult(trial, rung, epochs, metrics["val_acc"], metrics["test_acc"], metrics["seconds"],
                           str(folder / "model.pt"), worker=worker, process=proc.pid, peak_mb=peak)
    return TrialResult(trial, rung, epochs, float("nan"), float("nan"), 0.0, "", error, worker=worker,
                       process=proc.pid, peak_mb=peak)


def _watch(proc: subprocess.Popen, budget_mb: int) -> tuple[str, str, int, bool]:
    """Wait for ``proc``, reading its output; kill it when it holds more than ``budget_mb``.
    Returns (stdout, stderr, peak MB seen, whether it was killed for its memory)."""
    peak, over, started = 0, False, time.monotonic()
    while True:
        try:
            stdout, stderr = proc.communicate(timeout=WATCH_S if time.monotonic() - started > 1 else WATCH_S / 4)
            return stdout, stderr, peak, over
        except subprocess.TimeoutExpired:
            peak = max(peak, _resident_mb(proc.pid))
            if peak > budget_mb and not over:
                over = True
                proc.kill()


def _die_with(parent: int) -> None:
    """Make this process die when ``parent`` does (Linux's parent-death signal), so that a trial whose worker was
    killed does not train on unseen; exit at once if the parent is gone already."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        raise SystemExit(1)


def _train_one(job: dict) -> None:
    """The trial's own process: train, print the metrics as the last line of stdout; an error is the last
    line of stderr."""
    if job.get("parent"):
        _die_with(job["parent"])
    try:
        metrics = train_on_dataset(job["data"], job["arch"], job["out"], TrainConfig.model_validate(job["config"]),
                                   image_size=job["image_size"])
    except Exception as exc:  # noqa: BLE001 - reported to the parent in one line
        print(f"{type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps({k: metrics[k] for k in ("val_acc", "test_acc", "seconds")}))


if __name__ == "__main__":
    _train_one(json.loads(sys.argv[1]))
