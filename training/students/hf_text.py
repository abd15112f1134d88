"""A BERT text tower built with Hugging Face transformers from a local config (no hub access).

    tower = BertTower({"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                       "intermediate_size": 1536}, vocab_size=30522, context_length=77)
    tokens, mask = tower(ids, pad_id)    # [B, L, 384], [B, L]

The config is `transformers.BertConfig`'s keys (MiniLM-L6-H384 is BERT with 6 layers, 384 wide,
12 heads), written in the model JSON: nothing is read from the hub. `vocab_size` and
`max_position_embeddings` follow the tokenizer (its vocabulary and context length) unless the
JSON sets them. Weights are random, or come from a state dict (`model.student_init`, an export).

Initialisation: transformers' BERT init, except the segment (token type) and position embeddings,
which start at zero. The tower never uses segments, so its type embedding is one vector added to
every token, and a position embedding is shared by every caption that reaches it. At BERT's std
of 0.02, the std of the word embeddings too, those common parts dominate a fresh tower's mean
pool (pairwise cosine of a batch's text embeddings 0.98 on the synthetic captions) and slow its
learning: trained alone against a teacher's frozen image embeddings (30 steps, batch 32, lr 1e-3,
seeds 0/1/2) the tiny student's contrastive loss ended at 2.92 / 3.12 / 2.91 with them and
2.44 / 2.60 / 2.53 from zero (docs/objectives.md, "The two-tower students"). Both still learn.
"""
from __future__ import annotations

import torch
from torch import nn


class BertTower(nn.Module):
    def __init__(self, config: dict, vocab_size: int, context_length: int):
        super().__init__()
        from transformers import BertConfig, BertModel
        settings = {"vocab_size": vocab_size, "max_position_embeddings": context_length,
                    "use_cache": False,  # an encoder: no key/value cache
                    **config}
        if settings["vocab_size"] < vocab_size:
            raise ValueError(f"text.config.vocab_size {settings['vocab_size']} is smaller than "
                             f"the tokenizer's {vocab_size} ids")
        self.bert = BertModel(BertConfig(**settings), add_pooling_layer=False)
        self.out_dim = int(self.bert.config.hidden_size)
        self.context_length = context_length
        embeddings = self.bert.embeddings
        nn.init.zeros_(embeddings.token_type_embeddings.weight)
        nn.init.zeros_(embeddings.position_embeddings.weight)

    def forward(self, ids: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = ids != pad_id
        tokens = self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return tokens, mask

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.bert.activation_checkpointing_enable()  # transformers 5's name
        else:
            self.bert.activation_checkpointing_disable()
