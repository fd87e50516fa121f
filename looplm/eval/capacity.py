"""Bits of knowledge a model stores about a ``capo`` world (Allen-Zhu & Li, Physics of LMs 3.3).

Each attribute's values over the ``people`` individuals are uniform random: they hold
``people · log2(V)`` bits.  If the model's cross-entropy on the value tokens of those people
totals ``L_a`` bits, arithmetic coding with its predictions compresses them into about
``L_a`` bits, so the model holds at least

    bits_a = max(0, people · log2 V − L_a)

bits of attribute a (a model that knows nothing can be replaced by the uniform code, hence
the floor at 0).  The knowledge stored is Σ_a bits_a; divided by the parameter count it is
bits per parameter.  A second, accuracy-only estimate is Fano's bound: with exact-match
accuracy p on attribute a, ``people · max(0, log2 V − h(p) − (1 − p) log2(V − 1))`` bits,
h the binary entropy (0 at or below chance accuracy 1/V).  Both are computed for every loop
step from one forward per batch.
"""

from __future__ import annotations

import math

import torch

from looplm.data.tasks import CapoTask, TaskBatches
from looplm.eval.curves import IGNORE_INDEX, collect_step_records, exact_match


def bits_from_losses(loss_bits: torch.Tensor, attribute: torch.Tensor, attributes: int, people: int,
                     values: int) -> float:
    """Σ_a max(0, people·log2 V − Σ_{facts of a} loss) for per-fact losses in bits [F] and each
    fact's attribute index [F]."""
    per_attribute = torch.zeros(attributes, dtype=torch.float64).index_add_(0, attribute, loss_bits.double())
    return float((people * math.log2(values) - per_attribute).clamp_min(0).sum())


def fano_bits(accuracy: float, people: int, values: int) -> float:
    """Fano's lower bound on the bits in ``people`` uniform V-ary values known with accuracy p.

    Fano's inequality holds for guesses among the V values; a model's argmax may be no value
    at all, so accuracy at or below chance (1/V) counts as knowing nothing (the bound is 0
    at p = 1/V and increases above it)."""
    p = min(max(accuracy, 0.0), 1.0)
    if p <= 1.0 / values:
        return 0.0
    binary_entropy = 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    return people * max(0.0, math.log2(values) - binary_entropy - (1 - p) * math.log2(values - 1))


@torch.no_grad()
def knowledge_bits(model, task: CapoTask, tokenizer, steps: int | None = None, batch_size: int = 256) -> dict:
    """Bits stored, bits per parameter and accuracy for loop steps 1..steps (default T), over
    every fact of ``task`` once; ``bits`` and ``bits_per_parameter`` are those of step T."""
    steps = steps or model.config.loop_steps
    eval_set = TaskBatches(task, tokenizer).eval_set_of(task.facts())
    # Score the value tokens only: the eos after them is the same for every fact.
    value_targets = eval_set.targets.masked_fill(eval_set.targets == tokenizer.eos_id, IGNORE_INDEX)
    batches = ((eval_set.inputs[begin:begin + batch_size], value_targets[begin:begin + batch_size])
               for begin in range(0, len(eval_set), batch_size))
    records = collect_step_records(model, batches, steps)
    facts = records.rows
    attribute = torch.arange(facts) % task.attributes
    parameters = model.num_parameters()
    bits, fano, accuracy = [], [], []
    for step in range(records.steps):
        loss_bits = torch.zeros(facts, dtype=torch.float64).index_add_(
            0, records.example, records.losses[step].double() / math.log(2))
        bits.append(bits_from_losses(loss_bits, attribute, task.attributes, task.people, task.values))
        hits = records.hits[step]
        wrong = torch.zeros(facts).index_add_(0, records.example, (~hits).float()) > 0
        fano.append(sum(fano_bits(float((~wrong[attribute == a]).float().mean()), task.people, task.values)
                        for a in range(task.attributes)))
        accuracy.append(exact_match(records, torch.full((records.positions,), step + 1)))
    trained = min(model.config.loop_steps, steps) - 1
    return {"people": task.people, "attributes": task.attributes, "values": task.values,
            "prior_bits": task.prior_bits, "parameters": parameters, "bits_by_step": bits,
            "bits_per_parameter_by_step": [value / parameters for value in bits], "fano_bits_by_step": fano,
            "accuracy_by_step": accuracy, "bits": bits[trained], "bits_per_parameter": bits[trained] / parameters}
