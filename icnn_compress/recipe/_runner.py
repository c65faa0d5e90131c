"""The stage runner: checks everything, then runs the recipe's stages into a run directory.

Order of work in ``Runner.run``: the recipe is resolved (``RunContext.check``: dataset, model on the
meta device, layers, criterion, weights file, device), the run directory is checked (``--force`` and
``--resume`` rules, see ``_rundir``) and the stage plan is checked (every stage's inputs exist or are
produced in this run). Only then is anything written.

Each stage has a key: the SHA-256 of the recipe sections it reads, and of the keys and checksums of
the stages it reads from. ``resume`` skips a stage whose manifest carries its key and whose files
verify; a stage folder left by another key is set aside; a stage's own training checkpoints carry
the key too, so a resumed stage continues exactly where it was killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from functools import partial
from pathlib import Path

from icnn_compress import _dist
from icnn_compress._io import atomic_write_json
from icnn_compress.errors import ConfigError, IcnnCompressError
from icnn_compress.recipe._context import RunContext
from icnn_compress.recipe._load import recipe_hash
from icnn_compress.recipe._rundir import RESOLVED, LockError, RunDirectory
from icnn_compress.recipe._schema import Recipe
from icnn_compress.recipe._stages import STAGE_FUNCTIONS

__all__ = [
    "DEPENDS",
    "SECTIONS",
    "STAGES",
    "TRAINING_STAGES",
    "LockError",
    "RankStopped",
    "Runner",
    "run_recipe",
]

log = logging.getLogger(__name__)

# the stages every rank runs under torchrun (DDP); the others run on rank 0 alone
TRAINING_STAGES = ("finetune", "recover")
STAGES = ("finetune", "analyse", "prune", "recover", "export", "quantize", "measure", "report")
# the stages whose outputs a stage reads, and the recipe sections it reads
DEPENDS: dict[str, tuple[str, ...]] = {
    "finetune": (),
    "analyse": ("finetune",),
    "prune": ("finetune",),
    "recover": ("finetune", "prune"),  # the fine-tuned model is the distillation teacher
    "export": ("finetune", "recover"),
    "quantize": ("export",),
    "measure": ("finetune", "recover", "export", "quantize"),
    "report": ("measure",),
}
# stages whose outputs a stage reads when they exist (the report shows the analysis when it ran):
# part of the key, not required by the plan
OPTIONAL_INPUTS: dict[str, tuple[str, ...]] = {"report": ("analyse", "prune")}
SECTIONS: dict[str, tuple[str, ...]] = {
    "finetune": ("seed", "data", "model", "icnn", "finetune"),
    "analyse": ("seed", "data", "analysis"),
    # analysis.distance_threshold: icnn-cluster's clusters; recover.epochs: whether the classifier is
    # refit (prune.refit_classifier: null)
    "prune": ("seed", "data", "analysis", "prune", "recover.epochs"),
    "recover": ("seed", "data", "recover"),
    "export": ("name", "data", "export"),
    "quantize": ("seed", "data", "quantize"),
    "measure": ("seed", "data", "measure"),
    "report": ("name", "measure"),
}


def _lookup(data: dict, path: str):
    """``data["a"]["b"]`` for the dotted recipe key ``"a.b"`` (a whole section for ``"a"``)."""
    for part in path.split("."):
        data = data[part]
    return data


class Runner:
    """Runs a recipe's stages into ``run_dir`` (see ``STAGES``).

    Args:
        recipe: the validated recipe.
        run_dir: output folder. A new or empty one is used as is; an existing run directory needs
            ``resume`` or ``force``; any other non-empty folder is refused.
        resume: skip finished stages (same key, checksums verified); an unfinished stage continues
            from its last training checkpoint.
        force: replace an existing *run directory* (see ``RunDirectory.check`` for what is refused).
        stages: run only these stages; the stages they read from must be finished or listed.
        device: ``"cpu"``, ``"cuda"``...; ``None`` = CUDA when available.
        progress: progress bars and one line per stage on stdout.
        rerun: stages that run again even when they finished with the same key (``prune-recipe
            report`` rewrites the report this way); a stage after them runs again only if its key
            changes.
    """

    def __init__(
        self,
        recipe: Recipe,
        run_dir: str | os.PathLike,
        *,
        resume: bool = False,
        force: bool = False,
        stages: list[str] | None = None,
        device: str | None = None,
        progress: bool = True,
        rerun: list[str] | tuple[str, ...] = (),
    ) -> None:
        bad = [s for s in (*(stages or ()), *rerun) if s not in STAGES]
        if bad or stages == []:
            raise ConfigError(f"Unknown stage(s) {bad or stages}; stages are {', '.join(STAGES)}.")
        if resume and force:
            raise ConfigError("--resume and --force contradict each other: pass one of them.")
        self.recipe = recipe
        self.ctx = RunContext(recipe, device=device, progress=progress)
        self.dir = RunDirectory(run_dir, STAGES)
        self.run_dir = self.dir.path
        self.resume, self.force = resume, force
        self.stages = [s for s in STAGES if s in (stages or STAGES)]
        self.rerun = set(rerun)  # stages that run again even when they finished with this key
        self.progress = progress
        self.hash = recipe_hash(recipe)
        self._keys: dict[str, str] = {}

    # ----- helpers -----
    @staticmethod
    def report_file(run_dir: str | os.PathLike) -> Path:
        """Where a run directory's HTML report is."""
        return RunDirectory(run_dir, STAGES).stage_dir("report") / "report.html"

    def stage_dir(self, stage: str) -> Path:
        return self.dir.stage_dir(stage)

    def _say(self, msg: str) -> None:
        """A stage line: logged at INFO; printed as well when ``progress`` is on and nobody has
        configured logging for the package (API use)."""
        log.info(msg)
        if self.progress and not logging.getLogger("icnn_compress").handlers:
            print(msg, flush=True)

    def stage_key(self, stage: str) -> str:
        """The key of ``stage``: its recipe sections and its inputs' keys and checksums."""
        data = self.recipe.model_dump(mode="json")
        inputs = {}
        for dep in (*DEPENDS[stage], *OPTIONAL_INPUTS.get(stage, ())):
            manifest = self.dir.manifest(dep) or {}
            inputs[dep] = {"key": manifest.get("key"), "checksums": manifest.get("checksums")}
        sections = {s: _lookup(data, s) for s in SECTIONS[stage]}
        payload = {"stage": stage, "sections": sections, "inputs": inputs}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def finished(self, stage: str) -> bool:
        """True when ``stage`` has a manifest with its current key and its files verify."""
        return self.dir.finished(stage, self.stage_key(stage))[0]

    def finetuned_model(self):
        """The fine-tuned model of this run directory and its ICNN spec."""
        return self.ctx.load_finetuned(self.stage_dir("finetune") / "model.pt")

    def _check_plan(self) -> None:
        """Every selected stage's inputs are finished here or produced by an earlier selected stage."""
        produced: set[str] = set()
        for stage in self.stages:
            for dep in DEPENDS[stage]:
                if dep in produced:
                    continue
                if self.force or not self.dir.is_run_directory or not self.finished(dep):
                    raise ConfigError(
                        f"Stage {stage!r} reads the outputs of {dep!r}, which has not finished in "
                        f"{self.run_dir}: add {dep} to --stages (or run without --stages)."
                    )
            produced.add(stage)

    # ----- running -----
    def check(self) -> None:
        """Everything ``run`` checks before it writes anything."""
        self.ctx.check(training="finetune" in self.stages or "recover" in self.stages)
        self.dir.check(resume=self.resume, force=self.force)
        self._check_plan()

    def run(self) -> Path:
        """Check, then run the stages; returns the run directory. Under ``torchrun`` (a process
        group of several ranks) see ``_run_ranks``."""
        if _dist.is_distributed():
            return self._run_ranks()
        self.check()
        with self.dir:
            self._start()
            for stage in self.stages:
                key = self._plan(stage)
                if key is not None:
                    self._call_and_finish(stage, key)
        return self.run_dir

    def _start(self) -> None:
        self.dir.open(force=self.force)
        atomic_write_json(self.recipe.model_dump(mode="json"), self.run_dir / RESOLVED)

    def _plan(self, stage: str) -> str | None:
        """The stage's key and a fresh stage folder, or ``None`` when it finished earlier."""
        key = self.stage_key(stage)
        done, why = self.dir.finished(stage, key)
        if done and stage not in self.rerun:
            self._say(f"[{stage}] finished earlier, checksums verified: skipped")
            return None
        if done:
            why = "asked to run it again"
        if (self.stage_dir(stage) / "manifest.json").exists():
            self._say(f"[{stage}] {why}: running the stage again")
        self._t0 = time.perf_counter()
        self.dir.begin_stage(stage, key)
        return key

    def _call(self, stage: str, key: str) -> tuple[list[str], dict]:
        self.ctx.start_stage(stage)
        return STAGE_FUNCTIONS[stage](self.ctx, self.dir, self.stage_dir(stage), key)

    def _call_and_finish(self, stage: str, key: str) -> None:
        self._finish(stage, key, *self._call(stage, key))

    def _finish(self, stage: str, key: str, files: list[str], info: dict) -> None:
        seconds = time.perf_counter() - self._t0
        self.dir.finish_stage(stage, key, files, info, seconds, self.hash)
        self._say(f"[{stage}] done in {seconds:.1f} s -> {self.stage_dir(stage)}")

    def _run_ranks(self) -> Path:
        """Under ``torchrun``: rank 0 checks, locks the run directory, writes every file and runs
        the stages that do not train; all ranks run the training stages (``finetune``,
        ``recover``) together with DDP, each on its shard of the data; the others wait in
        between. Rank 0 broadcasts the outcome of every step, so an error stops all ranks."""
        lead = _dist.rank() == 0

        def agreed(step) -> object:
            """Run ``step`` on rank 0; every rank gets its result, or stops on its error."""
            outcome, error = None, None
            if lead:
                try:
                    outcome = ("ok", step())
                except Exception as exc:  # every rank stops on rank 0's error
                    outcome, error = ("error", f"{type(exc).__name__}: {exc}"), exc
            status, value = _dist.broadcast(outcome)
            if status == "error":
                if error is not None:
                    raise error
                raise RankStopped(f"rank 0 stopped ({value})")
            return value

        agreed(self.check)
        with self.dir if lead else contextlib.nullcontext():
            agreed(self._start)
            for stage in self.stages:
                key = agreed(partial(self._plan, stage))
                if key is None:
                    continue
                if stage in TRAINING_STAGES:
                    self.ctx.shard = True
                    try:
                        result = self._call(stage, key)
                    finally:
                        self.ctx.shard = False
                    agreed(partial(self._finish, stage, key, *result))
                else:
                    agreed(partial(self._call_and_finish, stage, key))
        return self.run_dir


class RankStopped(IcnnCompressError):
    """A rank other than 0 stops because rank 0 met an error (rank 0 reports it)."""


def run_recipe(recipe: Recipe, run_dir, **kwargs) -> Path:
    """Python entry point of ``prune-recipe run``."""
    return Runner(recipe, run_dir, **kwargs).run()
