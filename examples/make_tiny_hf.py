"""Save tiny random Hugging Face checkpoints to try `moonforge import` without downloading anything.

    python examples/make_tiny_hf.py out/hf
writes, with transformers' own classes and `save_pretrained` (safetensors):
    out/hf/deepseek_v3/   DeepseekV3ForCausalLM (Moonlight's architecture: MLA + sigmoid-routed MoE
                          with shared experts) at recipes/tiny-from-hf.yaml's LM shape, plus a
                          tokenizer.json with Moonlight-style chat tokens and no image tokens
    out/hf/siglip/        SiglipVisionModel at the recipe's vision shape (8 x 8 patch grid)
The weights are random (seeded): the point is the formats, the mapping and the parity, not
knowledge. The tokenizer is a byte-level BPE fitted on Python standard-library docstrings (the
text corpus that ships with Python), 2044 tokens; `moonforge import` adds the 4 media tokens the
chat format needs and grows the embedding to the recipe's 2048 rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHAT_TOKENS = [
    "<|endoftext|>",
    "<|pad|>",
    "<|im_system|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_middle|>",
    "<|im_end|>",
]
"""Moonlight-style chat specials; no <|media_*|> tokens (the import adds them)."""
VOCAB = 2044


def tokenizer(vocab_size: int = VOCAB) -> Tokenizer:
    """A byte-level BPE over stdlib docstrings + the toy world's words, with CHAT_TOKENS."""
    from moonforge.stages.data.stdlib_text import harvest

    texts = [text for _, text in harvest(3_000_000)]
    texts += [
        "user\n",
        "assistant\n",
        "system\n",
        "image",
        "a red circle and a blue square on the left of a green triangle",
        "Question: how many circles? Answer: 3",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHAT_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise SystemExit(f"the BPE came out with {got} tokens, not {vocab_size}")
    return tok


def deepseek_v3(out: Path, vocab_size: int = VOCAB) -> None:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        routed_scaling_factor=1.0,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_theta=50000.0,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():  # a non-zero router bias, so the import must carry it
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.01)
    model.save_pretrained(out)
    tokenizer(vocab_size).save(str(out / "tokenizer.json"))


def siglip(out: Path) -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_channels=3,
        image_size=64,
        patch_size=8,
        layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
    )
    torch.manual_seed(1)
    SiglipVisionModel(cfg).save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="directory to write deepseek_v3/ and siglip/ into")
    args = ap.parse_args()
    deepseek_v3(args.out / "deepseek_v3")
    siglip(args.out / "siglip")
    print(f"wrote {args.out / 'deepseek_v3'} and {args.out / 'siglip'}")


if __name__ == "__main__":
    main()
