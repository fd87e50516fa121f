"""lm-evaluation-harness adapter: ``--model looplm`` evaluates a looped checkpoint at a chosen
depth or exit policy (optional extra ``looplm[lmeval]``).

lm-eval's three request types, for a sequence x = [prefix] + tokens:
- ``loglikelihood(context, continuation)`` → (Σ_i log p(c_i | x_<i), every c_i the argmax),
  the inputs cut from the left to ``max_seq_len`` as lm-eval's own causal models do;
- ``loglikelihood_rolling(text)`` → Σ log p over lm-eval's disjoint rolling windows of
  ``max_seq_len`` tokens (``get_rolling_token_windows`` + ``make_disjoint_window``), every
  token predicted exactly once;
- ``generate_until(context, gen_kwargs)`` → text up to the first ``until`` string, eos, or
  ``max_gen_toks`` tokens (greedy, or sampled per ``do_sample``/``temperature``/``top_k``/``top_p``).

Which loop step answers (model_args ``steps=N``, ``exit=…``; ``looplm.exit_policy.parse_exit``):
- ``static``: every token reads the readout of step N (default: the trained T);
- ``q:<q>``: Ouro's Q-exit, the first step n with CDF(n) = 1 − Π_{j≤n}(1 − λ_j) ≥ q;
- ``hidden:<ε>``: the first step t ≥ 2 with ‖r_t − r_{t−1}‖ / ‖r_t‖ < ε;
- ``kl:<ε>``: the first step t ≥ 2 with KL(p_t ‖ p_{t−1}) < ε;
- ``act`` / ``act:<threshold>``: ACT's halting-weighted readout Σ_t w_t r_t.
Scoring runs one forward in which every token runs all N steps and takes each token's
log-probs from its own exit step.  That is what a decoder computes when every token's keys
and values are cached at every step (the per-step cache layout the prompt prefill uses).
``generate_until`` with static, q and act decodes through ``looplm.generate`` with real early
exit: there an exited token's K/V are copied into the deeper steps (LAST_EXITED), so a later
token that runs deeper attends to copies — generation may differ from scoring in the last
digits.  hidden and kl have no decoder policy; they decode on the per-step layout above.

lm-eval 0.4.13 finds models only in its own registry (no entry points): looplm's install adds a
start-up hook (``_looplm_lm_eval.py``, run from ``looplm-lm-eval.pth``) that registers ``looplm``
there lazily, so the plain ``lm_eval --model looplm`` works; so do ``python -m
looplm.eval.lm_eval_adapter`` with lm_eval's arguments, ``looplm lm-eval`` and ``evaluate``
(docs/LM_EVAL.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from looplm.checkpoint.atomic import atomic_write_text
from looplm.device import resolve_device
from looplm.errors import LoopLMError, is_int, one_line
from looplm.exit_policy import ACTExit, ExitPolicy, Signal, check_depth, exit_steps, parse_exit, readout_perplexity
from looplm.model.exit import hidden_change, readout_kl

try:
    import lm_eval.models  # noqa: F401  (built-in names first: get_model fills only an empty registry)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as error:  # pragma: no cover - exercised only without the extra
    try:
        from importlib.metadata import version as _version

        _found = f"lm-eval {_version('lm_eval')} is too old"
    except Exception:
        _found = "lm-eval is not installed"
    raise LoopLMError(f"{_found} ({error}): the adapter needs lm-eval >= 0.4.10: "
                      "pip install -U 'looplm[lmeval]'") from None

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PREFIXES = ("bos", "eos")
AUTO_BATCH_LOGITS = 2 ** 26  # batch_size=auto: rows × max_seq_len × vocab ≤ this many floats (256 MB)
MAX_AUTO_BATCH = 64
SUPPORTED_GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def exit_steps_of(output, policy: ExitPolicy) -> torch.Tensor:
    """Per token, the 1-based step whose readout answers, from a full forward [B, S] → [B, S]:
    the policy's own decision (``exit_policy.exit_steps``) over the forward's per-step signals."""
    states, shape = output.hidden_states, output.hidden_states[0].shape[:-1]
    if policy.signal is Signal.GATE and output.gate_logits is None:
        raise LoopLMError("exit=q needs a model with an exit gate: use static, hidden:<eps> or kl:<eps>")

    def signal(step: int) -> torch.Tensor:
        if policy.signal is Signal.GATE:
            return output.gate_logits[step].reshape(-1)
        if policy.signal is Signal.PERPLEXITY:
            return readout_perplexity(output.logits(step + 1)).reshape(-1)
        if step == 0:
            return torch.zeros(shape.numel())
        if policy.signal is Signal.READOUT_CHANGE:
            return hidden_change(states[step - 1], states[step]).reshape(-1)
        return readout_kl(output.logits(step), output.logits(step + 1)).reshape(-1)

    return exit_steps(policy, output.steps, shape.numel(), signal).view(shape).to(states[0].device)


def exit_logprobs(output, targets: torch.Tensor, policy: ExitPolicy) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(target) under each token's exit readout, whether the target is that readout's
    argmax, and the step used: targets [B, S] → three [B, S] tensors.  ACT reads the
    halting-weighted state and reports the halting step."""
    if isinstance(policy, ACTExit):
        state, _, steps = output.act(policy.threshold)
        log_probs = F.log_softmax(output.model.logits(state).float(), dim=-1)
        return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), log_probs.argmax(-1) == targets, steps
    steps = exit_steps_of(output, policy)
    chosen_logprob = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    greedy = torch.zeros(targets.shape, dtype=torch.bool, device=targets.device)
    for step in steps.unique().tolist():
        log_probs = F.log_softmax(output.logits(step).float(), dim=-1)
        here = steps == step
        chosen_logprob = torch.where(here, log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), chosen_logprob)
        greedy = torch.where(here, log_probs.argmax(-1) == targets, greedy)
    return chosen_logprob, greedy, steps


def _integer(name: str, value, minimum: int) -> int:
    if not is_int(value) or value < minimum:
        raise LoopLMError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _auto_batch_size(config) -> int:
    return max(1, min(MAX_AUTO_BATCH, AUTO_BATCH_LOGITS // (config.max_seq_len * config.vocab_size)))


class LoopLMEval(TemplateLM):
    """lm-eval ``LM`` over a looplm checkpoint (model_args: see ``ARGUMENTS`` and docs/LM_EVAL.md)."""

    ARGUMENTS = ("pretrained", "steps", "exit", "device", "dtype", "batch_size", "max_batch_size", "prefix",
                 "backend", "seed", "max_gen_toks", "tokenizer")

    def __init__(self, pretrained=None, steps=None, exit="static", device=None, dtype="float32", batch_size=1,
                 max_batch_size=None, prefix="bos", backend="auto", seed=1234, max_gen_toks=256,
                 tokenizer=None, **unknown):
        super().__init__()
        if unknown:
            raise LoopLMError(f"unknown looplm model_args {', '.join(sorted(unknown))}: the keys are"
                              f" {', '.join(self.ARGUMENTS)}")
        import looplm
        from looplm.model.lm import LoopLM
        from looplm.steppers import backend_names

        if dtype not in DTYPES:
            raise LoopLMError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if prefix not in PREFIXES:
            raise LoopLMError(f"prefix must be bos or eos, got {prefix!r}")
        if backend not in backend_names():
            raise LoopLMError(f"backend must be one of {', '.join(backend_names())}, got {backend!r}")
        self.exit = parse_exit(exit)
        self._device = resolve_device(device, cuda_falls_back=True)  # lm_eval's --device default is cuda:0
        if isinstance(pretrained, LoopLM):
            if tokenizer is None:
                raise LoopLMError("an in-memory model needs tokenizer= (a looplm Tokenizer, 'byte' or a path)")
            model, self.checkpoint = pretrained, None
        elif pretrained in (None, ""):
            raise LoopLMError("model_args needs pretrained=DIR (a looplm checkpoint or run directory)")
        else:
            model, self.checkpoint = looplm.load(pretrained, device=self._device), str(pretrained)
        self.model = model.to(device=self._device, dtype=DTYPES[dtype]).eval()
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = looplm.load_tokenizer(pretrained if tokenizer is None else tokenizer)
        self.tokenizer = tokenizer
        if tokenizer.vocab_size > self.model.config.vocab_size:
            raise LoopLMError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only"
                              f" {self.model.config.vocab_size} embedding rows: wrong tokenizer")
        self.steps = self.model.config.loop_steps if steps in (None, "") else _integer("steps", steps, 1)
        self.exit = replace(self.exit, steps=self.steps)
        check_depth(self.exit, self.model.config.loop_steps)
        if self.exit.needs_gate and self.model.exit_gate is None:
            raise LoopLMError(f"exit={exit} needs a model with an exit gate: use static, hidden:<eps> or kl:<eps>")
        self.batch_size = self._parse_batch_size(batch_size, max_batch_size)
        self.prefix = prefix
        self.backend = backend
        self.seed = _integer("seed", seed, 0)
        self._max_gen_toks = _integer("max_gen_toks", max_gen_toks, 1)
        self.exit_step_total = 0
        self.exit_step_tokens = 0

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        """model_args win over lm_eval's --device/--batch_size (its --device defaults to cuda:0)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        extra = {key: value for key, value in (additional_config or {}).items() if value is not None}
        return cls(**{**extra, **arg_dict})

    def _parse_batch_size(self, batch_size, max_batch_size) -> int:
        """An integer, or "auto"/"auto:N": as many rows as fit ``AUTO_BATCH_LOGITS`` logits."""
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            size = _auto_batch_size(self.model.config)
        else:
            try:
                size = int(batch_size)
            except (TypeError, ValueError):
                raise LoopLMError(f"batch_size must be a positive integer or auto, got {batch_size!r}") from None
            if size < 1:
                raise LoopLMError(f"batch_size must be >= 1, got {batch_size!r}")
        return min(size, int(max_batch_size)) if max_batch_size else size

    # Tokenization (TemplateLM turns (context, continuation) strings into ids with these).

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The token every scored sequence starts with: bos (as ``looplm generate`` prompts) or eos
        (what a model trained on eos-separated text saw before each document)."""
        return self.tokenizer.bos_id if self.prefix == "bos" else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return f"looplm-{self.tokenizer.kind}-{self.tokenizer.vocab_size}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Ids of ``string``, after the prefix token unless ``add_special_tokens`` is False."""
        ids = self.tokenizer.encode(string)
        return ids if add_special_tokens is False else [self.prefix_token_id] + ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([tokens] if isinstance(tokens, int) else tokens)

    # Scoring.

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (cache key or None, context ids, continuation ids).  Longest first, batches
        right-padded (causal, so padding never changes a real position)."""
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), desc="looplm loglikelihood", disable=disable_tqdm)
        for begin in range(0, len(order), self.batch_size):
            chunk = order[begin:begin + self.batch_size]
            for index, answer in zip(chunk, self._score_batch([requests[i] for i in chunk])):
                results[index] = answer
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
            progress.update(len(chunk))
        progress.close()
        return results

    @torch.no_grad()
    def _score_batch(self, batch) -> list[tuple[float, bool]]:
        windows = []
        for _, context, continuation in batch:
            if not continuation:
                raise LoopLMError("an lm-eval request has an empty continuation: nothing to score")
            if len(continuation) > self.max_length:
                raise LoopLMError(f"a continuation of {len(continuation)} tokens exceeds the context of"
                                  f" {self.max_length} (model.max_seq_len)")
            windows.append(((context + continuation)[-(self.max_length + 1):], len(continuation)))
        width = max(len(tokens) - 1 for tokens, _ in windows)
        inputs = torch.full((len(windows), width), self.tokenizer.pad_id, dtype=torch.long)
        targets = torch.full((len(windows), width), self.tokenizer.pad_id, dtype=torch.long)
        scored = torch.zeros((len(windows), width), dtype=torch.bool)
        for row, (tokens, continuation_length) in enumerate(windows):
            length = len(tokens) - 1
            inputs[row, :length] = torch.tensor(tokens[:-1])
            targets[row, :length] = torch.tensor(tokens[1:])
            scored[row, length - continuation_length:length] = True
        output = self.model(inputs.to(self.device), steps=self.steps)
        log_probs, greedy, steps = exit_logprobs(output, targets.to(self.device), self.exit)
        scored = scored.to(self.device)
        totals = torch.where(scored, log_probs, 0.0).sum(-1).tolist()
        all_greedy = (greedy | ~scored).all(-1).tolist()
        self.exit_step_total += int(steps[scored].sum())
        self.exit_step_tokens += int(scored.sum())
        return [(total, bool(match)) for total, match in zip(totals, all_greedy)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Σ log p(text) over lm-eval's disjoint windows: the first window conditions on the prefix
        token, each later one on the max_seq_len − (predicted) tokens before it."""
        windows, owners = [], []
        for owner, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tokenizer.encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # Generation.

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """One request at a time (batch 1): prompt = prefix + context, cut from the left to keep
        max(max_seq_len − max_gen_toks, max_seq_len / 2) tokens; decoding stops at eos, an
        ``until`` string (cut from the text), ``max_gen_toks`` or the end of the context."""
        from looplm.generate import Sampling

        results = []
        warned = set()
        for index, request in enumerate(tqdm(requests, desc="looplm generate_until", disable=disable_tqdm)):
            context, gen_kwargs = request.args
            for key in set(gen_kwargs) - SUPPORTED_GEN_KWARGS - warned:
                log.warning("looplm ignores the generation argument %r", key)
                warned.add(key)
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = [stop for stop in handle_stop_sequences(kwargs.get("until"), eos=None) if stop]
            max_new = int(kwargs["max_gen_toks"])
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            sampling = Sampling(temperature, int(kwargs.get("top_k") or 0), float(kwargs.get("top_p") or 1.0),
                                seed=self.seed + index)
            keep = max(self.max_length - max_new, self.max_length // 2)
            prompt = self.tok_encode(context)[-keep:]
            text = postprocess_generated_text(self._generate(prompt, max_new, sampling, until), until, None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            results.append(text)
        return results

    def _generate(self, prompt: list[int], max_new: int, sampling, until: list[str]) -> str:
        from looplm.generate import generate

        if self.exit.signal in (Signal.READOUT_CHANGE, Signal.LOGITS_CHANGE):
            return self.tokenizer.decode(self.decode_converged(prompt, max_new, sampling, until))
        result = generate(self.model, prompt, max_new, sampling, self.exit, self.tokenizer, until,
                          backend=self.backend)
        self.exit_step_total += sum(result.steps)
        self.exit_step_tokens += len(result.steps)
        return result.text

    @torch.no_grad()
    def decode_converged(self, prompt: list[int], max_new: int, sampling, until: list[str] = ()) -> list[int]:
        """New token ids, every token running all steps (each step's cache holds its real K/V) and
        each new token taken from its exit step: the scoring path, one token at a time, which is
        ``generate`` with the ``full`` KV layout and the convergence policy (reference backend: the
        same modules the scoring forward runs).  Stops at eos (not returned), once the text holds
        an ``until`` string, or at the budget."""
        from looplm.generate import generate

        result = generate(self.model, prompt, max_new, sampling, self.exit, self.tokenizer, until,
                          backend="reference", layout="full")
        self.exit_step_total += sum(result.decision_steps)
        self.exit_step_tokens += len(result.decision_steps)
        return result.ids

    def get_model_info(self) -> dict:
        """Added to lm-eval's results["config"]: what was evaluated and the loop steps it used."""
        mean = self.exit_step_total / self.exit_step_tokens if self.exit_step_tokens else None
        return {"looplm_checkpoint": self.checkpoint, "looplm_steps": self.steps,
                "looplm_exit": self.exit.spec(),
                "looplm_mean_exit_step": mean, "model_num_parameters": self.model.num_parameters()}


def evaluate(pretrained, tasks, steps: int | None = None, exit: str = "static", device: str = "auto",
             dtype: str = "float32", batch_size: int | str = 1, include_path=None, include_defaults: bool | None = None,
             limit: int | float | None = None, num_fewshot: int | None = None, log_samples: bool = False,
             **simple_evaluate_kwargs) -> dict:
    """Run lm-eval's ``simple_evaluate`` on a looplm checkpoint (or an in-memory LoopLM with
    ``tokenizer=`` among the kwargs; it is moved to ``device``/``dtype`` and put in eval mode);
    returns lm-eval's results dict.

    tasks: names or a comma-separated string.  include_path: directories of task YAMLs.
    include_defaults None builds lm-eval's built-in task index (~15 s) only when some task is
    not found under include_path.
    """
    from lm_eval import simple_evaluate

    task_names = [name for name in (tasks.split(",") if isinstance(tasks, str) else tasks) if name]
    if not task_names:
        raise LoopLMError("give at least one lm-eval task")
    model_args = {"pretrained": pretrained, "steps": steps, "exit": exit, "device": device, "dtype": dtype,
                  "batch_size": batch_size}
    if "tokenizer" in simple_evaluate_kwargs:
        model_args["tokenizer"] = simple_evaluate_kwargs.pop("tokenizer")
    if isinstance(pretrained, (str, os.PathLike)):
        from looplm.checkpoint.directory import resolve_checkpoint

        resolve_checkpoint(pretrained)  # a wrong path fails now, not after lm-eval has indexed its tasks
    task_manager = task_manager_for(task_names, include_path, include_defaults)
    if isinstance(pretrained, (str, os.PathLike)):  # by name, so the results record model and model_args
        model, model_args = "looplm", {**model_args, "pretrained": str(pretrained)}
    else:
        model, model_args = LoopLMEval(**model_args), None
    try:
        with _quiet_git_hash():
            return simple_evaluate(model=model, model_args=model_args, tasks=task_names, task_manager=task_manager,
                                   limit=limit, num_fewshot=num_fewshot, log_samples=log_samples,
                                   **simple_evaluate_kwargs)
    except FileNotFoundError as error:  # datasets' own, from a task whose data files are not where it looks
        raise LoopLMError(missing_task_data(error, _include_paths(include_path))) from None


@contextmanager
def _quiet_git_hash():
    """lm-eval records the git commit of the current directory by running ``git describe``, whose
    "fatal: not a git repository" reaches the terminal when run elsewhere, as if the evaluation had
    failed: meanwhile the same lookup runs with git's complaint dropped (and lm-eval's fallback,
    reading a ``.git`` directory, where git cannot run)."""
    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None:  # another lm-eval: leave it as it is
        yield
        return

    def quiet() -> str | None:
        try:
            found = subprocess.run(["git", "describe", "--always"], capture_output=True, check=True, timeout=30)
            return found.stdout.decode(errors="replace").strip()
        except (OSError, subprocess.SubprocessError):
            from lm_eval.loggers.utils import get_commit_from_path

            return get_commit_from_path(os.getcwd())

    evaluator.get_git_commit_hash = quiet
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def missing_task_data(error: FileNotFoundError, include_paths: list[str]) -> str:
    """One line for a task's data that could not be found: the missing file, that paths in a task
    YAML are relative to the current directory, and the include path that holds it, if one does."""
    found = re.search(r"Unable to find '([^']+)'", str(error))
    if found is None:
        return f"lm-eval could not load a task's data ({one_line(error)}): check the task YAML's dataset settings"
    missing, here = Path(found.group(1)), Path.cwd()
    relative = missing.relative_to(here) if missing.is_relative_to(here) else Path(missing.name)
    beside = next((Path(path) for path in include_paths if (Path(path) / relative).is_file()), None)
    hint = (f"; '{beside / relative}' exists: run from '{beside}' or make the YAML's path absolute" if beside
            else ": make the path absolute, or run from the directory it is relative to")
    return (f"a task's data file '{missing}' does not exist: paths in a task YAML (dataset_kwargs.data_files) are"
            f" relative to the current directory ({here}), not to the YAML{hint}")


def _include_paths(include_path) -> list[str]:
    """``include_path`` (one path, several, or None) as a list of strings."""
    return [str(path) for path in ([include_path] if isinstance(include_path, (str, os.PathLike))
                                   else include_path or [])]


def task_manager_for(task_names: list[str], include_path=None, include_defaults: bool | None = None):
    """lm-eval's TaskManager over include_path; the built-in index only when needed (or asked)."""
    from lm_eval.tasks import TaskManager

    paths = _include_paths(include_path)
    for path in paths:
        if not Path(path).exists():
            raise LoopLMError(f"include path {path!r} does not exist")
        if not Path(path).is_dir():
            yaml = Path(path).suffix.lower() in (".yaml", ".yml")
            raise LoopLMError(f"include path {path!r} is a file, not a directory: give the directory that holds the"
                              " task YAMLs" + (f" (here {str(Path(path).parent)!r})" if yaml else ""))
    if include_defaults is None:
        local = TaskManager(include_path=paths or None, include_defaults=False) if paths else None
        if local is not None and len(local.match_tasks(task_names)) == len(task_names):
            return local
        include_defaults = True
    manager = TaskManager(include_path=paths or None, include_defaults=include_defaults)
    missing = [name for name in task_names if not manager.match_tasks([name])]
    if missing:
        raise LoopLMError(f"lm-eval task(s) not found: {', '.join(missing)} (give --include-path DIR for local"
                          " task YAMLs)")
    return manager


def write_results(results: dict, path: str | Path) -> Path:
    """Write lm-eval's results as JSON atomically; never replaces an existing file."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    if path.exists():
        raise LoopLMError(f"{str(path)!r} already exists: remove it or choose another output file")
    return atomic_write_text(path, json.dumps(results, indent=2, default=handle_non_serializable) + "\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m looplm.eval.lm_eval_adapter ARGS``: lm-eval's own command line with ``looplm``
    registered by this import (for environments without looplm's start-up hook, which lets the
    plain ``lm_eval`` find it)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv))
    try:
        cli_evaluate()
    except LoopLMError as error:
        print(f"looplm: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ != "__main__":
    # lm-eval's name for this model.  Where looplm's start-up hook (_looplm_lm_eval.py) already put
    # the placeholder "looplm.eval.lm_eval_adapter:LoopLMEval" there, lm-eval swaps in the class.
    register_model("looplm")(LoopLMEval)
else:
    # ``python -m`` runs this file as __main__, a second copy whose class lm-eval would refuse
    # under the placeholder's name: run the real module's main instead.
    from looplm.eval import lm_eval_adapter

    sys.exit(lm_eval_adapter.main())
