"""`opd make-steering-vector`: the mean activation difference of two prompt sets at one decoder layer, for
`opd serve-teacher --steering-vector` (SafeSteer's steered teacher, docs/methods.md).

    v = mean_{x ∈ POSITIVE} h_ℓ(x) − mean_{x ∈ NEGATIVE} h_ℓ(x)

h_ℓ(x) is the output of decoder layer ℓ (the residual stream after it, the value the service adds α·v to)
at the last token of the rendered prompt (chat template with the assistant header: the position the answer
starts from), or with --positions mean the mean over all the prompt's tokens. This is the difference-of-means
direction used for refusal steering (Arditi et al. 2024, *Refusal in Language Models Is Mediated by a Single
Direction*, arXiv 2406.11717); SafeSteer builds its teacher "via activation steering" and its paper's exact
recipe for the vector is not reproduced here (our choice of the last-token, difference-of-means form).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from opd_common.steering_format import VECTOR_FORMAT, VECTOR_NAME, decoder_layers


@torch.no_grad()
def layer_activations(model, tokenizer, prompts, layer: int, positions: str) -> torch.Tensor:
    """[N, H] float64: decoder layer `layer`'s output per prompt (last token, or mean over the prompt)."""
    from opd_student.prompts import render

    captured: list[torch.Tensor] = []

    def keep(module, args, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach())

    try:
        layers = decoder_layers(model)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if not 0 <= layer < len(layers):
        raise SystemExit(f"error: --layer {layer}: the model has decoder layers 0..{len(layers) - 1}")
    handle = layers[layer].register_forward_hook(keep)
    rows = []
    try:
        for prompt in prompts:
            ids = torch.tensor([render(prompt, tokenizer)], device=model.device)
            captured.clear()
            model(input_ids=ids, use_cache=False)
            hidden_1_L_H = captured[0].to(torch.float64)
            rows.append(hidden_1_L_H[0, -1] if positions == "last" else hidden_1_L_H[0].mean(dim=0))
    finally:
        handle.remove()
    return torch.stack(rows)


def make_vector(
    model_path: Path, positive: str, negative: str, layer: int, positions: str = "last"
) -> tuple[torch.Tensor, dict[str, str]]:
    """(v [H] float32, metadata) for the two prompt sets (files or shipped sets)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_student.prompts import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    pos = layer_activations(model, tokenizer, load_prompts(positive), layer, positions)
    neg = layer_activations(model, tokenizer, load_prompts(negative), layer, positions)
    vector_H = (pos.mean(dim=0) - neg.mean(dim=0)).to(torch.float32)
    metadata = {
        "format": VECTOR_FORMAT,
        "layer": str(layer),
        "positions": positions,
        "model": str(model_path),
        "positive": f"{positive} ({len(pos)} prompts)",
        "negative": f"{negative} ({len(neg)} prompts)",
        "mean_activation_norm": f"{float(torch.cat([pos, neg]).norm(dim=1).mean()):.6g}",
    }
    return vector_H, metadata


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "make-steering-vector",
        help="a steering vector for opd serve-teacher: the mean activation difference of two prompt sets",
        description="v = mean activation of POSITIVE prompts − mean of NEGATIVE prompts at the output of decoder "
        "layer --layer (the last prompt token, or the mean over the prompt); serve a steered teacher with "
        "opd serve-teacher --steering-vector FILE [--steering-scale A].",
    )
    p.add_argument(
        "--model", default="default", help="'default' (the default student), an embedded name, or a path"
    )
    p.add_argument("--positive", required=True, help="prompt file (or shipped set) the vector points towards")
    p.add_argument("--negative", required=True, help="prompt file (or shipped set) it points away from")
    p.add_argument("--layer", type=int, required=True, help="0-based decoder layer whose output is measured")
    p.add_argument(
        "--positions", choices=["last", "mean"], default="last", help="which prompt tokens (default: last)"
    )
    p.add_argument("--out", type=Path, required=True, help="the .safetensors to write")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    from opd_common.embedded import resolve_model
    from opd_student.tools.make_student import resolve_student

    path = resolve_student("default") if args.model == "default" else resolve_model(args.model)[0]
    vector_H, metadata = make_vector(path, args.positive, args.negative, args.layer, args.positions)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({VECTOR_NAME: vector_H.contiguous()}, args.out, metadata=metadata)
    print(
        f"wrote {args.out}: layer {args.layer}, ‖v‖ = {float(vector_H.norm()):.4g} "
        f"(mean ‖h‖ = {metadata['mean_activation_norm']}); {metadata['positive']} − {metadata['negative']}"
    )
