"""MoE dispatch: training tokens/s of looplm's sorted dispatch vs a masked per-(k, expert) loop.

The baseline is the dispatch of OpenMythos's MoE, rebuilt here from its description: for
every top-k slot and every expert, a boolean mask over all tokens selects that expert's
tokens, which are run and added back.  Both run the same ``MoE`` module (same router, same
experts, same weights), timed in the same process: forward + backward + AdamW step of one
MoE FFN on a batch of tokens.  The two outputs are checked equal before timing.

    python benchmarks/moe_dispatch.py                  # 64 experts, top-4 (issue #3: >= 5x)
    python benchmarks/moe_dispatch.py --experts 16 --top-k 2 --json moe.json
"""

from __future__ import annotations

import argparse
import json

import torch

from looplm.bench import median_rate
from looplm.config import ModelConfig
from looplm.model.moe import MoE


def masked_loop_forward(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The baseline: a Python loop over (k, expert) with a boolean mask over all tokens each."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    chosen, weights, _ = layer.route(x)
    y = torch.zeros_like(x)
    for slot in range(layer.top_k):
        for index in range(layer.n_experts):
            mask = chosen[:, slot] == index
            if mask.any():
                y = y.index_put((mask,), y[mask] + weights[mask, slot, None] * layer.expert(index, x[mask]))
    if layer.shared is not None:
        y = y + layer.shared(x)
    return y.view(shape)


def tokens_per_second(layer: MoE, forward, x: torch.Tensor, steps: int, repeats: int) -> float:
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-4)
    target = torch.randn_like(x)

    def one_step():
        loss = (forward(layer, x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_rate(one_step, x.shape[0] * x.shape[1], steps, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--expert-hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig(d_model=args.d_model, n_heads=4, ffn="moe", n_experts=args.experts, moe_top_k=args.top_k,
                         expert_hidden=args.expert_hidden, n_shared_experts=1, moe_bias_update_rate=0.0)
    layer = MoE(config)
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    x = torch.randn(args.batch, args.seq, args.d_model)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), masked_loop_forward(layer, x), atol=1e-5, rtol=1e-4)
    sorted_rate = tokens_per_second(layer, MoE.forward, x, args.steps, args.repeats)
    masked_rate = tokens_per_second(layer, masked_loop_forward, x, args.steps, args.repeats)
    results = {
        "experts": args.experts, "top_k": args.top_k, "d_model": args.d_model, "expert_hidden": args.expert_hidden,
        "tokens_per_step": args.batch * args.seq, "threads": torch.get_num_threads(),
        "sorted_dispatch_tokens_per_s": sorted_rate, "masked_loop_tokens_per_s": masked_rate,
        "speedup": sorted_rate / masked_rate,
    }
    for key, value in results.items():
        print(f"{key:>30}: {value:,.1f}" if isinstance(value, float) else f"{key:>30}: {value}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
