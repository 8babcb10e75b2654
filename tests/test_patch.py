"""mask_model on tiny random configs of each model family: swapping must not change outputs while every
score is positive, heads stay unmasked, unmask_model bakes the mask in."""
import pytest
import torch
import transformers as T

import abp

FAMILIES = {
    "bert": lambda: T.BertForSequenceClassification(T.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, num_labels=3)),
    "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, num_labels=2)),
    "distilbert": lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64)),
}


def _out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("t_l", [None, 1e5])
def test_swap_keeps_outputs_and_heads(family, t_l):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    ids = torch.randint(1, 99, (2, 11))
    before = _out(model, ids)
    abp.mask_model(model, t_l=t_l)
    names = [n for n, _ in abp.masked_modules(model)]
    assert names and not any(p in n for n in names for p in ("classifier", "lm_head", "score", "pre_classifier"))
    torch.testing.assert_close(_out(model, ids), before, rtol=0, atol=0)
    assert abp.sparsity(model) == 0.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith("scores") or any(h in n for h in ("classifier", "lm_head", "score")) for n in trainable)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_unmask_bakes_the_mask(family):
    torch.manual_seed(1)
    model = FAMILIES[family]().eval()
    ids = torch.randint(1, 99, (2, 7))
    abp.mask_model(model)
    for _, m in abp.masked_modules(model):
        with torch.no_grad():
            m.scores.copy_(torch.randn_like(m.scores))
    masked = _out(model, ids)
    sp = abp.sparsity(model)
    assert 0.4 < sp < 0.6
    abp.unmask_model(model)
    assert not list(abp.masked_modules(model))
    torch.testing.assert_close(_out(model, ids), masked, rtol=1e-5, atol=1e-5)
    if family == "gpt2":
        assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_include_exclude_filter_and_double_mask():
    model = FAMILIES["bert"]()
    abp.mask_model(model, include=[r"attention"], filter_fn=lambda m, n: "key" not in n)
    names = [n for n, _ in abp.masked_modules(model)]
    assert names and all("attention" in n and "key" not in n for n in names)
    with pytest.raises(ValueError, match="already masked"):
        abp.mask_model(model)
    with pytest.raises(ValueError, match="no module matched"):
        abp.mask_model(FAMILIES["bert"](), include=["nothing-like-this"])
    with pytest.raises(TypeError, match="unknown option"):
        abp.mask_model(FAMILIES["bert"](), colour="red")


def test_layernorm_and_bias_masking():
    model = FAMILIES["bert"]().eval()
    ids = torch.randint(1, 99, (2, 5))
    before = _out(model, ids)
    abp.mask_model(model, layernorm=True, mask_bias=True)
    kinds = {type(m).__name__ for _, m in abp.masked_modules(model)}
    assert kinds == {"MaskedLinear", "MaskedEmbedding", "MaskedLayerNorm"}
    torch.testing.assert_close(_out(model, ids), before, rtol=0, atol=0)
    model.train()
    model(input_ids=ids).logits.sum().backward()
    for name, m in abp.masked_modules(model):
        for which, _, s in m.score_pairs():
            assert s.grad is not None, f"{name}.{which} got no score gradient"


def test_embedding_grad_matches_dense_formula():
    emb = torch.nn.Embedding(11, 6, padding_idx=0)
    m = abp.MaskedEmbedding.from_embedding(emb)
    with torch.no_grad():
        m.scores.copy_(torch.randn(11, 6))
    ids = torch.tensor([[1, 3, 3, 0], [5, 1, 10, 2]])
    out = m(ids)
    g = torch.randn_like(out)
    out.backward(g)
    s = m.scores.detach()
    dense = torch.zeros(11, 6).index_add_(0, ids.reshape(-1), g.reshape(-1, 6))
    dense[0] = 0  # padding row gets no gradient, as in nn.Embedding
    sig = torch.sigmoid(s)
    torch.testing.assert_close(m.scores.grad, dense * emb.weight.detach() * sig * (1 - sig))
    torch.testing.assert_close(out, emb.weight.detach()[ids] * (s[ids] > 0))


def test_exclude_keeps_heads_excluded_and_config_untouched():
    """A user ``exclude`` adds to the head exclusion instead of replacing it; a passed MaskConfig is not changed."""
    model = FAMILIES["llama"]()
    cfg = abp.MaskConfig(exclude=[r"mlp"])
    abp.mask_model(model, cfg, embeddings=False)
    names = [n for n, _ in abp.masked_modules(model)]
    assert names and not any("mlp" in n or "lm_head" in n for n in names), names
    assert cfg.embeddings is True and list(cfg.exclude) == [r"mlp"]
    with_head = FAMILIES["llama"]()
    abp.mask_model(with_head, include=[r"lm_head"], mask_heads=True)
    assert [n for n, _ in abp.masked_modules(with_head)] == ["lm_head"]
