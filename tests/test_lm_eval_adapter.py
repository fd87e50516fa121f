"""The lm-eval adapter (``--model looplm``) against hand-computed references on a tiny checkpoint.

References are plain loops over the model's own forward: log-softmax at the continuation
positions, each token's exit step found by walking its gates / readouts step by step.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from looplm import LoopLM, LoopLMError, ModelConfig  # noqa: E402
from looplm.cli import main  # noqa: E402
from looplm.data.tokenizer import byte_tokenizer  # noqa: E402
from looplm.eval.lm_eval_adapter import LoopLMEval  # noqa: E402
from looplm.exit_policy import parse_exit  # noqa: E402
from looplm.generate import Sampling  # noqa: E402
from looplm.model.exit import act_weights_reference  # noqa: E402

DATA = Path(__file__).parent / "data" / "lm_eval"
CONTEXT = 48
STEPS = 3
PAIRS = [
    ("The sky is", " blue"),
    ("Two plus two", " equals four"),
    ("", "orphan continuation"),
    ("context with a trailing space ", "word"),
    ("x" * 70, " after a context longer than the model's window"),
    ("a", "b"),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    model = LoopLM(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, n_core_layers=2,
                               loop_steps=STEPS, max_seq_len=CONTEXT, tie_embeddings=False))
    torch.nn.init.normal_(model.exit_gate.weight, std=0.5)  # exit steps that vary per token
    with torch.no_grad():  # greedy text stays ASCII: bytes 64..127 mirror 0..63, so max ≥ 0 = the rest
        model.head.weight[128:] = 0.0
        model.head.weight[64:128] = -model.head.weight[:64]
    directory = tmp_path_factory.mktemp("lm_eval") / "ckpt"
    model.save(directory, tokenizer=tokenizer)
    return directory


@pytest.fixture(scope="module")
def model(checkpoint):
    import looplm

    return looplm.load(checkpoint)


def requests(kind, arguments):
    return [Instance(kind, {}, args, index) for index, args in enumerate(arguments)]


def pair_ids(context, continuation, bos):
    """lm-eval's split: trailing spaces of the context move to the continuation; an empty
    context becomes the prefix token.  Bytes, so encoding the parts equals splitting the whole."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    return [bos] + list(stripped.encode()), list(continuation.encode())


def reference_steps(model, readouts, gates, spec, steps):
    """Exit step per position [S] by walking the steps one at a time."""
    length = readouts[0].shape[0]
    chosen = [steps] * length
    for position in range(length):
        if spec.kind == "q":
            survival = 1.0
            for step in range(steps):
                survival *= 1.0 - float(torch.sigmoid(gates[step][position]))
                if 1.0 - survival >= spec.value or step == steps - 1:
                    chosen[position] = step + 1
                    break
        elif spec.kind in ("hidden", "kl"):
            for step in range(1, steps):
                before, after = readouts[step - 1][position], readouts[step][position]
                if spec.kind == "hidden":
                    distance = float((after - before).norm() / after.norm())
                else:
                    p_after = F.log_softmax(model.logits(after), -1)
                    p_before = F.log_softmax(model.logits(before), -1)
                    distance = float((p_after.exp() * (p_after - p_before)).sum())
                if distance < spec.value:
                    chosen[position] = step + 1
                    break
    return chosen


@torch.no_grad()
def reference_loglikelihood(model, context_ids, continuation_ids, exit="static", steps=STEPS):
    """(Σ log p(continuation), all greedy, exit steps) from one unbatched forward."""
    policy = parse_exit(exit)
    spec = SimpleNamespace(kind=policy.name, value=getattr(policy, policy.parameter) if policy.parameter else None)
    tokens = (context_ids + continuation_ids)[-(CONTEXT + 1):]
    output = model(torch.tensor([tokens[:-1]]), steps=steps)
    readouts = [state[0] for state in output.hidden_states]
    gates = output.gate_logits[:, 0]
    if spec.kind == "act":
        weights, halting = act_weights_reference(gates, spec.value or model.config.act_threshold)
        state = sum(weight.unsqueeze(-1) * readout for weight, readout in zip(weights, readouts))
        position_logits = [model.logits(row) for row in state]
        chosen = halting.tolist()
    else:
        chosen = reference_steps(model, readouts, gates, spec, steps)
        position_logits = [model.logits(readouts[step - 1][position]) for position, step in enumerate(chosen)]
    total, greedy, used = 0.0, True, []
    first = len(tokens) - 1 - len(continuation_ids)
    for position in range(first, len(tokens) - 1):
        log_probs = F.log_softmax(position_logits[position], -1)
        total += float(log_probs[tokens[position + 1]])
        greedy &= int(log_probs.argmax()) == tokens[position + 1]
        used.append(chosen[position])
    return total, greedy, used


def median_distance(model, kind):
    """A threshold that splits positions between exiting at step 2 and running on: the median
    distance between steps 1 and 2 over the test's continuations."""
    text = "".join(continuation for _, continuation in PAIRS)[:CONTEXT].encode()
    with torch.no_grad():
        first, second = model(torch.tensor([list(text)])).hidden_states[:2]
        if kind == "hidden":
            distances = (second - first).norm(dim=-1) / second.norm(dim=-1)
        else:
            log_first, log_second = F.log_softmax(model.logits(first), -1), F.log_softmax(model.logits(second), -1)
            distances = (log_second.exp() * (log_second - log_first)).sum(-1)
    return float(distances.median())


def exits_to_check(model):
    return [("static", STEPS), ("static", 5), ("q:0.5", STEPS), ("q:0.2", 5), ("act", STEPS),
            (f"hidden:{median_distance(model, 'hidden'):.6g}", STEPS),
            (f"kl:{median_distance(model, 'kl'):.6g}", STEPS)]


def test_loglikelihood_matches_hand_computed_forward(checkpoint, model):
    bos = byte_tokenizer().bos_id
    for exit, steps in exits_to_check(model):
        adapter = LoopLMEval(pretrained=str(checkpoint), steps=steps, exit=exit, batch_size=4, device="cpu")
        answers = adapter.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
        used_steps = set()
        for (context, continuation), (log_prob, greedy) in zip(PAIRS, answers):
            expected, expected_greedy, used = reference_loglikelihood(model, *pair_ids(context, continuation, bos),
                                                                      exit=exit, steps=steps)
            assert log_prob == pytest.approx(expected, abs=1e-4), (exit, context)
            assert greedy == expected_greedy
            used_steps.update(used)
        if exit.split(":")[0] in ("q", "hidden", "kl"):
            assert len(used_steps) > 1, f"{exit}: every token exited at the same step, the test shows nothing"


def test_batching_does_not_change_scores(checkpoint):
    pairs = PAIRS * 2
    answers = {}
    for batch_size in (1, 4, "auto"):
        adapter = LoopLMEval(pretrained=str(checkpoint), exit="q:0.5", batch_size=batch_size, device="cpu")
        answers[batch_size] = adapter.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for batched in (answers[4], answers["auto"]):
        for (one, one_greedy), (many, many_greedy) in zip(answers[1], batched):
            assert many == pytest.approx(one, abs=1e-5)
            assert many_greedy == one_greedy


@torch.no_grad()
def test_rolling_loglikelihood_sums_disjoint_windows(checkpoint, model):
    text = ("A document of one hundred and thirty bytes or so, which is much longer than the window of"
            " forty-eight tokens.")
    tokens = list(text.encode())
    bos = byte_tokenizer().bos_id
    # Window 1 predicts tokens[0:48] from [bos] + tokens[0:47]; each later window predicts the next
    # (up to) 48 tokens with the 48 tokens before its last prediction as input.
    expected, predicted, windows = 0.0, 0, 0
    while predicted < len(tokens):
        end = min(predicted + CONTEXT, len(tokens))
        inputs = ([bos] + tokens)[max(0, end - CONTEXT):end]
        log_probs = F.log_softmax(model(torch.tensor([inputs])).logits()[0], -1)
        for position in range(predicted, end):
            expected += float(log_probs[position - (end - len(inputs)), tokens[position]])
        predicted, windows = end, windows + 1
    assert windows == 3
    adapter = LoopLMEval(pretrained=str(checkpoint), batch_size=2, device="cpu")
    totals = adapter.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,), ("",), ("short",)]),
                                           disable_tqdm=True)
    assert totals[0] == pytest.approx(expected, abs=1e-4)
    assert totals[1] == 0.0
    short, _, _ = reference_loglikelihood(model, [bos], list(b"short"))
    assert totals[2] == pytest.approx(short, abs=1e-5)


def test_generate_until_stops_at_until_strings(checkpoint, model):
    prompt = "Once upon a time"
    for exit in ("static", "q:0.5", "act", f"kl:{median_distance(model, 'kl'):.6g}"):
        adapter = LoopLMEval(pretrained=str(checkpoint), exit=exit, device="cpu", backend="reference")
        free = adapter.generate_until(requests("generate_until", [(prompt, {"until": [], "max_gen_toks": 16})]),
                                      disable_tqdm=True)[0]
        assert len(free.encode()) == 16, free  # the budget, in byte tokens
        # A two-character stop string first seen after the start of the text.
        stop = next(free[i:i + 2] for i in range(1, len(free) - 1) if free.find(free[i:i + 2]) == i)
        for until in ([stop, "never"], stop):
            cut = adapter.generate_until(requests("generate_until", [(prompt, {"until": until, "max_gen_toks": 16})]),
                                         disable_tqdm=True)[0]
            assert cut == free[:free.find(stop)] and cut, (exit, free, stop)
        short = adapter.generate_until(requests("generate_until", [(prompt, {"until": [], "max_gen_toks": 5})]),
                                       disable_tqdm=True)[0]
        assert short == free[:5]


def test_static_generation_is_looplm_generate(checkpoint, model):
    from looplm.generate import QExit, generate

    tokenizer = byte_tokenizer()
    adapter = LoopLMEval(pretrained=str(checkpoint), exit="q:0.5", device="cpu")
    text = adapter.generate_until(requests("generate_until", [("Hello", {"until": ["\n"], "max_gen_toks": 10})]),
                                  disable_tqdm=True)[0]
    direct = generate(model, [tokenizer.bos_id] + tokenizer.encode("Hello"), 10, exit_policy=QExit(0.5),
                      tokenizer=tokenizer, stop_strings=["\n"])
    assert text == direct.text


@torch.no_grad()
def test_converged_decoding_is_greedy_under_its_own_scoring(checkpoint, model):
    """Greedy decode under kl/hidden exit runs the per-step cache; scoring its tokens with the
    full forward must find every one of them the argmax at its exit step."""
    from looplm.eval.lm_eval_adapter import exit_logprobs

    prompt = [byte_tokenizer().bos_id] + list(b"Looped models")
    for exit in (f"kl:{median_distance(model, 'kl'):.6g}", f"hidden:{median_distance(model, 'hidden'):.6g}"):
        adapter = LoopLMEval(pretrained=str(checkpoint), exit=exit, device="cpu")
        new = adapter.decode_converged(prompt, 12, Sampling())
        assert len(new) >= 4
        tokens = torch.tensor([prompt + new])
        _, greedy, steps = exit_logprobs(model(tokens[:, :-1]), tokens[:, 1:], adapter.exit)
        assert greedy[0, len(prompt) - 1:].all()


def test_bad_model_args_are_one_line_errors(checkpoint, tmp_path):
    cases = [
        (dict(pretrained=str(checkpoint), temperature=1), "unknown looplm model_args temperature"),
        (dict(pretrained=str(checkpoint), exit="fast"), "unknown exit 'fast'"),
        (dict(pretrained=str(checkpoint), exit="q:1.5"), "q must be in [0, 1]"),
        (dict(pretrained=str(checkpoint), exit="kl:much"), "needs a number"),
        (dict(pretrained=str(checkpoint), steps=0), "steps must be an integer >= 1"),
        (dict(pretrained=str(checkpoint), batch_size="many"), "batch_size must be"),
        (dict(pretrained=str(checkpoint), dtype="float64"), "dtype must be one of"),
        (dict(pretrained=str(tmp_path / "missing")), "not found"),
        (dict(), "needs pretrained=DIR"),
    ]
    for kwargs, message in cases:
        with pytest.raises(LoopLMError, match=None) as caught:
            LoopLMEval(**kwargs)
        assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    with pytest.raises(LoopLMError, match="unknown looplm model_args bogus"):
        LoopLMEval.create_from_arg_string(f"pretrained={checkpoint},bogus=1", {"device": "cpu"})
    gateless = tmp_path / "gateless"
    LoopLM(ModelConfig(vocab_size=259, d_model=16, n_heads=2, n_core_layers=1, loop_steps=2,
                       exit_gate=False)).save(gateless, tokenizer=byte_tokenizer())
    with pytest.raises(LoopLMError, match="needs a model with an exit gate"):
        LoopLMEval(pretrained=str(gateless), exit="q:0.5")


def test_model_args_win_over_lm_eval_defaults(checkpoint):
    adapter = LoopLMEval.create_from_arg_string(f"pretrained={checkpoint},steps=5,exit=q:0.5,batch_size=3",
                                                {"batch_size": 1, "device": "cuda:0", "max_batch_size": None})
    assert (adapter.steps, adapter.exit.name, adapter.exit.threshold, adapter.batch_size) == (5, "q", 0.5, 3)
    assert adapter.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def offline_lm_eval(monkeypatch, tmp_path):
    """Run from the task data directory (the YAMLs name their jsonl relative to it), cache the
    datasets under tmp_path, and skip lm-eval's environment report (collect_env takes ~3 s)."""
    import datasets
    import lm_eval.evaluator

    monkeypatch.chdir(DATA)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)


def test_cli_runs_three_request_types_through_lm_eval(checkpoint, model, offline_lm_eval, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["lm-eval", str(checkpoint), "--tasks", "looplm_choice,looplm_text,looplm_gen", "--include-path",
                 str(DATA), "--exit", "q:0.5", "--batch-size", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "looplm_choice" in printed and "mean exit step" in printed
    results = json.loads(out.read_text())
    assert results["config"]["looplm_exit"] == "q:0.5"
    bos = byte_tokenizer().bos_id
    # acc: the choice (after lm-eval's " " delimiter) with the highest log-likelihood is the answer.
    documents = [json.loads(line) for line in (DATA / "choice.jsonl").read_text().splitlines()]
    correct = 0
    for document in documents:
        scores = [reference_loglikelihood(model, *pair_ids(document["question"], " " + choice, bos), exit="q:0.5")[0]
                  for choice in document["choices"]]
        correct += max(range(len(scores)), key=scores.__getitem__) == document["answer"]
    assert results["results"]["looplm_choice"]["acc,none"] == pytest.approx(correct / len(documents))
    # bits per byte: −Σ log p / (bytes · ln 2) over the documents.
    texts = [json.loads(line)["text"] for line in (DATA / "text.jsonl").read_text().splitlines()]
    adapter = LoopLMEval(pretrained=str(checkpoint), exit="q:0.5", device="cpu")
    total = sum(adapter.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]), True))
    bits = -total / (sum(len(t.encode()) for t in texts) * math.log(2))
    assert results["results"]["looplm_text"]["bits_per_byte,none"] == pytest.approx(bits, rel=1e-5)
    assert "exact_match,none" in results["results"]["looplm_gen"]
    assert main(["lm-eval", str(checkpoint), "--tasks", "looplm_choice", "--include-path", str(DATA),
                 "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_evaluate_takes_an_in_memory_model(model, offline_lm_eval):
    from looplm.eval.lm_eval_adapter import evaluate

    results = evaluate(model, ["looplm_choice"], exit="kl:0.001", include_path=DATA, include_defaults=False,
                       limit=2, tokenizer=byte_tokenizer(), bootstrap_iters=0)
    assert results["config"]["looplm_exit"] == "kl:0.001" and results["config"]["looplm_checkpoint"] is None
    assert "acc,none" in results["results"]["looplm_choice"]


def test_cli_reports_more_fewshot_examples_than_a_task_has_in_one_line(checkpoint, offline_lm_eval, capsys):
    assert main(["lm-eval", str(checkpoint), "--tasks", "looplm_choice", "--include-path", str(DATA), "--limit", "2",
                 "--num-fewshot", "10"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("looplm: error: --num-fewshot 10 is more than") and "lower it" in error


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    assert main(["lm-eval", str(tmp_path / "nothing"), "--tasks", "looplm_choice", "--include-path", str(DATA)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("looplm: error:") and "not found" in error and "\n" not in error


def test_lm_eval_console_script_runs_model_looplm(checkpoint, model, tmp_path):
    """lm-eval's own ``lm_eval`` script, unmodified, with ``--model looplm`` (~20 s: lm-eval's CLI
    always builds its built-in task index): looplm's start-up hook registered the name.  Scores
    equal the adapter's in this process at the same depth and exit policy."""
    import sysconfig

    hook = Path(sysconfig.get_paths()["purelib"]) / "looplm-lm-eval.pth"
    assert hook.is_file(), f"{hook} is missing: install looplm with pip (setup.py writes it)"
    script = Path(sys.executable).with_name("lm_eval")
    command = [str(script), "--model", "looplm", "--model_args", f"pretrained={checkpoint},exit=q:0.5,steps=4",
               "--tasks", "looplm_choice,looplm_text", "--include_path", str(DATA), "--device", "cpu",
               "--batch_size", "2", "--output_path", str(tmp_path / "out")]
    environment = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_HUB_OFFLINE": "1"}
    environment.pop("LOOPLM_LM_EVAL_HOOK", None)
    finished = subprocess.run(command, cwd=DATA, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["config"]["looplm_steps"] == 4 and results["config"]["looplm_exit"] == "q:0.5"
    texts = [(json.loads(line)["text"],) for line in (DATA / "text.jsonl").read_text().splitlines()]
    adapter = LoopLMEval(pretrained=str(checkpoint), exit="q:0.5", steps=4, device="cpu")
    bits = -sum(adapter.loglikelihood_rolling(requests("loglikelihood_rolling", texts), True)) / (
        sum(len(text.encode()) for text, in texts) * math.log(2))
    assert results["results"]["looplm_text"]["bits_per_byte,none"] == pytest.approx(bits, rel=1e-5)
    documents = [json.loads(line) for line in (DATA / "choice.jsonl").read_text().splitlines()]
    bos = byte_tokenizer().bos_id
    correct = 0
    for document in documents:
        scores = [reference_loglikelihood(model, *pair_ids(document["question"], " " + choice, bos), exit="q:0.5",
                                          steps=4)[0] for choice in document["choices"]]
        correct += max(range(len(scores)), key=scores.__getitem__) == document["answer"]
    assert results["results"]["looplm_choice"]["acc,none"] == pytest.approx(correct / len(documents))


def test_start_up_hook_registers_looplm_lazily_and_can_be_switched_off():
    """The .pth hook adds ``looplm`` to lm-eval's registry when ``lm_eval.models`` is imported,
    as a placeholder (neither looplm nor torch imported yet); LOOPLM_LM_EVAL_HOOK=0 turns it off;
    lm-eval's own models stay reachable."""
    probe = ("import sys, lm_eval.models\n"
             "from lm_eval.api.registry import model_registry as r\n"
             "print('looplm' in r, 'looplm' in r and r._objs['looplm'] == "
             "'looplm.eval.lm_eval_adapter:LoopLMEval', 'looplm' in sys.modules, 'hf' in r)")
    outputs = {}
    for switch in ("1", "0"):
        environment = {**os.environ, "LOOPLM_LM_EVAL_HOOK": switch}
        finished = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True,
                                  timeout=120)
        assert finished.returncode == 0 and not finished.stderr, finished.stderr[-2000:]
        outputs[switch] = finished.stdout.split()
    assert outputs["1"] == ["True", "True", "False", "True"]
    assert outputs["0"] == ["False", "False", "False", "True"]


def test_an_lm_eval_too_old_for_the_adapter_is_named_and_the_hook_stays_quiet(tmp_path):
    """An lm-eval before 0.4.10 (no lazy model registry, no generation helpers), shadowed here by
    a stub package: importing lm_eval.models prints nothing from the hook, and the adapter's
    import error names the version it needs."""
    stub = tmp_path / "lm_eval"
    for module in ("__init__.py", "api/__init__.py", "api/model.py", "api/registry.py", "models/__init__.py",
                   "models/utils.py", "utils.py"):
        (stub / module).parent.mkdir(parents=True, exist_ok=True)
        (stub / module).write_text("")
    (stub / "api" / "model.py").write_text("class TemplateLM:\n    pass\n")
    (stub / "api" / "registry.py").write_text("MODEL_REGISTRY = {}\ndef register_model(*names):\n"
                                              "    return lambda cls: cls\n")
    probe = ("import lm_eval.models\nprint('imported')\nfrom looplm.errors import LoopLMError\ntry:\n"
             "    import looplm.eval.lm_eval_adapter\nexcept LoopLMError as error:\n    print(error)\n")
    environment = {**os.environ, "PYTHONPATH": str(tmp_path), "LOOPLM_LM_EVAL_HOOK": "1"}
    finished = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True,
                              timeout=120)
    assert finished.returncode == 0 and not finished.stderr, finished.stderr[-2000:]
    imported, message = finished.stdout.splitlines()
    assert imported == "imported" and "needs lm-eval >= 0.4.10" in message and "pip install -U" in message


def test_lm_eval_registry_resolves_looplm_to_the_adapter_class():
    """In this process (hook active or not), lm-eval's get_model finds the adapter's class, and
    the hook's register() leaves a taken name alone."""
    from lm_eval.api.registry import Registry, get_model

    import _looplm_lm_eval

    assert get_model("looplm") is LoopLMEval
    registry = Registry("model")
    assert _looplm_lm_eval.register(registry) and not _looplm_lm_eval.register(registry)
    assert registry.get("looplm") is LoopLMEval  # the placeholder resolves to the class


@pytest.mark.slow
def test_lm_eval_command_line_finds_looplm(checkpoint, tmp_path):
    """lm-eval's own CLI through ``python -m looplm.eval.lm_eval_adapter`` (~20 s: lm-eval's CLI
    always builds its built-in task index); ``test_lm_eval_console_script_runs_model_looplm``
    covers the same through the plain ``lm_eval`` script."""
    command = [sys.executable, "-m", "looplm.eval.lm_eval_adapter", "--model", "looplm", "--model_args",
               f"pretrained={checkpoint},exit=q:0.5,steps=4", "--tasks", "looplm_choice,looplm_text",
               "--include_path", str(DATA), "--device", "cpu", "--batch_size", "2",
               "--output_path", str(tmp_path / "out")]
    environment = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    finished = subprocess.run(command, cwd=DATA, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "looplm_choice" in finished.stdout and "bits_per_byte" in finished.stdout
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["config"]["looplm_steps"] == 4


def test_lm_eval_console_script_scores_a_hugging_face_export(checkpoint, model, tmp_path):
    """lm-eval's own ``lm_eval`` script, unmodified (~25 s): a looplm checkpoint exported with
    ``looplm convert hf`` is lm-eval's ``hf`` model (trust_remote_code), and ``loop_steps=`` in
    --model_args picks the depth.  Rolling bits per byte equal this adapter's at the same depth
    (both condition the first window on the same prefix token), and differ at another depth."""
    from looplm.interop.hf_directory import save_hf

    save_hf(model, tmp_path / "hf", tokenizer=byte_tokenizer())
    script = Path(sys.executable).with_name("lm_eval")
    command = [str(script), "--model", "hf", "--model_args",
               f"pretrained={tmp_path / 'hf'},trust_remote_code=True,dtype=float32,loop_steps=2",
               "--tasks", "looplm_text", "--include_path", str(DATA), "--device", "cpu", "--batch_size", "1",
               "--output_path", str(tmp_path / "out")]
    environment = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run(command, cwd=DATA, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    bits = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["looplm_text"][
        "bits_per_byte,none"]
    texts = [(json.loads(line)["text"],) for line in (DATA / "text.jsonl").read_text().splitlines()]
    size = sum(len(text.encode()) for text, in texts) * math.log(2)
    for steps, equal in ((2, True), (STEPS, False)):
        adapter = LoopLMEval(pretrained=str(checkpoint), steps=steps, device="cpu")
        ours = -sum(adapter.loglikelihood_rolling(requests("loglikelihood_rolling", texts), True)) / size
        assert (bits == pytest.approx(ours, rel=1e-5)) is equal


def test_evaluating_outside_a_git_repository_prints_no_git_complaint(model, tmp_path, monkeypatch, capfd):
    """lm-eval runs ``git describe`` to record the current directory's commit; outside a repository
    git's "fatal: not a git repository" would reach the terminal as if the evaluation had failed."""
    import shutil

    import datasets
    import lm_eval.evaluator

    from looplm.eval.lm_eval_adapter import evaluate

    tasks = tmp_path / "tasks"  # tmp_path is outside any repository
    shutil.copytree(DATA, tasks)
    monkeypatch.chdir(tasks)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    original = lm_eval.evaluator.get_git_commit_hash
    results = evaluate(model, ["looplm_choice"], include_path=tasks, include_defaults=False, limit=2,
                       tokenizer=byte_tokenizer(), bootstrap_iters=0)
    assert "acc,none" in results["results"]["looplm_choice"] and results["git_hash"] is None
    assert "fatal" not in capfd.readouterr().err
    assert lm_eval.evaluator.get_git_commit_hash is original  # put back
