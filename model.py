"""Every method of the paper as a prompt module P' (n, d) prepended to a frozen T5's encoder input
embeddings (relative position buckets: no positions to shift); `ft` has no prompt and trains T5."""
import contextlib

import torch
import torch.nn as nn

METHODS = ("ft", "pt", "ptuning", "resprompt", "ept", "ept_star")
REPARAMS, INITS = ("mlp", "lstm"), ("uniform", "vocab", "label")  # P-Tuning's; Table 6's
# §5.5 names ReLU only; Tanh and Sigmoid are the public EPT code's (our reading: its three)
ACTIVATIONS = {"none": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
# Table 6's "vocab" init (Lester et al. 2021): the 5,000 most frequent pieces, T5's ids 3..5002
VOCAB_FIRST_PIECE, VOCAB_SAMPLE_SIZE = 3, 5000
# the main setting (docs/paper.md, "Methods"); the learning rates: Appendix B.2
DEFAULTS = {"prompt_length": 10, "hidden_size": {"resprompt": 400, "ept": 1, "ept_star": 1},
            "broadcast": {"ept": 1, "ept_star": 10},
            "lr": {**dict.fromkeys(METHODS, 0.3), "ft": 1e-5}}
# prompt options (train.py's flags, config.json's keys): {name: (default, the methods that take it)}
EPTS = ("ept", "ept_star")
OPTIONS = {"prompt_length": (None, METHODS[1:4]), "reparam": ("mlp", ("ptuning",)),
           "hidden_size": (None, ("resprompt", *EPTS)), "broadcast": (None, EPTS),
           "layer_norm": (False, EPTS), "residual": (False, EPTS), "activation": ("none", EPTS),
           "depth": (1, EPTS), "extra_layer": (False, EPTS), "init": ("uniform", METHODS[1:])}


def applies(option, method):
    """False for an option `method` ignores (EPT: --prompt-length): its sweeps and names skip it."""
    return method in OPTIONS.get(option, (None, METHODS))[1]


def prompt_options(config):
    """build_prompt_module's options (not init) in config.json; a missing one: its default."""
    return {k: config.get(k, default) for k, (default, _) in OPTIONS.items() if k != "init"}


def init_prompt(rows, d_model, init="uniform", embedding=None, label_ids=None, generator=None):
    """Initial prompt table (rows, d): Appendix B.4 / Table 6."""
    if init == "uniform":  # U[-0.5, 0.5], Lester et al. 2021
        return torch.rand(rows, d_model, generator=generator) - 0.5
    if embedding is None or init == "label" and not label_ids:
        raise ValueError(f"init {init!r} needs the frozen embedding matrix"
                         + (" and the task's label token ids" if init == "label" else ""))
    embedding = embedding.detach().float().cpu()
    if init == "vocab":  # rows of the embedding matrix at ids from the 5,000 most frequent pieces
        high = min(VOCAB_FIRST_PIECE + VOCAB_SAMPLE_SIZE, embedding.size(0))  # tiny vocab: all
        return embedding[torch.randint(VOCAB_FIRST_PIECE, high, (rows,), generator=generator)]
    label_rows = embedding[torch.tensor(label_ids)]  # (k, d); EPT's one vector: their mean
    return (label_rows.mean(0, keepdim=True) if rows == 1
            else label_rows[torch.arange(rows) % len(label_ids)])  # else cycle the label words


class PromptTuning(nn.Module):
    """Lester et al. 2021: the prompt table itself, P' = P."""
    def __init__(self, table):
        super().__init__()
        self.prompt = nn.Parameter(table)  # (n, d)

    def forward(self):
        return self.prompt


class PTuning(PromptTuning):
    """Liu et al. 2021 as in HF PEFT: P' = MLP(P) per token, or an LSTM-then-MLP head."""
    def __init__(self, table, reparam="mlp"):
        super().__init__(table)
        d = table.size(1)
        if reparam == "mlp":  # PEFT default: 3 Linear layers with bias, ReLU between
            self.lstm, self.mlp = None, nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d),
                                                      nn.ReLU(), nn.Linear(d, d))
        else:  # PEFT's LSTM: 2-layer biLSTM (hidden d), then Linear(2d,2d) -> ReLU -> Linear(2d,d)
            self.lstm = nn.LSTM(d, d, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self):  # LSTM: (n, d) -> (n, 2d), then the MLP -> (n, d)
        return self.mlp(self.lstm(self.prompt[None])[0][0] if self.lstm else self.prompt)


class ResPrompt(PromptTuning):
    """Razdaibiedina et al. 2023: one shared bottleneck MLP f, applied twice (tied), one skip."""
    def __init__(self, table, hidden_size=400):
        super().__init__(table)
        d = table.size(1)
        self.down, self.up = nn.Linear(d, hidden_size), nn.Linear(hidden_size, d)
        self.norm = nn.LayerNorm(d)

    def forward(self):
        f = lambda x: self.norm(self.up(torch.relu(self.down(x))))
        return f(f(self.prompt)) + self.prompt  # P' = f(f(P)) + P


class EPTBlock(nn.Module):
    """One bias-free down-up map d -> h -> d, with the Figure 9 ablation switches. `extra_layer`: a
    bias-free h -> h layer between (Table 4's "additional MLP layer", §5.4: 2.3K on t5-base)."""
    def __init__(self, d, h=1, layer_norm=False, residual=False, activation="none",
                 extra_layer=False):  # parameters drawn in this order: down, extra, up
        super().__init__()
        self.down = nn.Linear(d, h, bias=False)
        self.extra = nn.Linear(h, h, bias=False) if extra_layer else nn.Identity()
        self.act, self.up = ACTIVATIONS[activation](), nn.Linear(h, d, bias=False)
        self.norm, self.residual = nn.LayerNorm(d) if layer_norm else nn.Identity(), residual

    def forward(self, x):
        y = self.norm(self.up(self.act(self.extra(self.down(x)))))
        return y + x if self.residual else y


class EPT(PromptTuning):
    """This paper: P1 (1, d) through `depth` down-up blocks, the row repeated n times (Figure 7)."""
    def __init__(self, vector, hidden_size=1, broadcast=1, depth=1, **switches):
        super().__init__(vector)  # (1, d)
        d, self.broadcast = vector.size(1), broadcast
        self.blocks = nn.Sequential(*[EPTBlock(d, hidden_size, **switches) for _ in range(depth)])

    def forward(self):
        return self.blocks(self.prompt).expand(self.broadcast, -1)  # (1, d) -> (n, d)


def FoldedPrompt(prompt):  # noqa: N802 (a module, as the classes above)
    """A fixed P' (n, d): what inference uses once the reparameterization is discarded."""
    return PromptTuning(prompt.detach().clone()).requires_grad_(False)


def build_prompt_module(method, d_model, *, prompt_length=None, reparam="mlp", hidden_size=None,
                         broadcast=None, layer_norm=False, residual=False, activation="none",
                         depth=1, extra_layer=False, init="uniform", embedding=None,
                         label_ids=None, generator=None):
    """The trainable prompt module of `method` (None for ft). P is drawn first (from `generator`,
    else the global stream), then the layers from the global stream: P and layers independent."""
    for name, value, valid in (("method", method, METHODS), ("reparam", reparam, REPARAMS),
                               ("activation", activation, ACTIVATIONS), ("init", init, INITS)):
        if value not in valid:
            raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(str, valid))}")
    if method == "ft":
        return None
    n = DEFAULTS["prompt_length"] if prompt_length is None else prompt_length
    h = DEFAULTS["hidden_size"].get(method) if hidden_size is None else hidden_size
    b = DEFAULTS["broadcast"].get(method) if broadcast is None else broadcast
    for key, value in zip(("prompt_length", "hidden_size", "broadcast", "depth"), (n, h, b, depth)):
        if value is not None and (type(value) is not int or value < 1):  # None: the default
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    table = init_prompt(1 if method in EPTS else n, d_model, init, embedding, label_ids, generator)
    if method in EPTS:
        return EPT(table, h, b, depth, layer_norm=layer_norm, residual=residual,
                   activation=activation, extra_layer=bool(extra_layer))
    return {"pt": PromptTuning, "ptuning": lambda t: PTuning(t, reparam),
            "resprompt": lambda t: ResPrompt(t, h)}[method](table)


class PromptedT5(nn.Module):
    """A T5 whose encoder input is [P'; embed(input_ids)]; frozen unless there is no prompt."""
    def __init__(self, t5, prompt_module=None):
        super().__init__()
        self.t5, self.prompt_module = t5, prompt_module
        t5.requires_grad_(prompt_module is None)  # `ft` trains T5; prompt methods freeze it

    # what trains, and what a checkpoint's "trainable" holds: the prompt module, or T5 (ft)
    trainable = property(lambda self: self.t5 if self.prompt_module is None else self.prompt_module)

    def prompt(self):
        return None if self.prompt_module is None else self.prompt_module()  # (n, d)

    def embed(self, input_ids, attention_mask, prompt=None, prompt_mask=None):
        """Encoder inputs, prompt rows first: the one place P' enters. `prompt`: (n, d) (default:
        this model's) or (B, n, d) (a pack's runs); `prompt_mask` (B, n): 0 on a pad row."""
        x = self.t5.get_input_embeddings()(input_ids)  # (B, L, d)
        p = self.prompt() if prompt is None else prompt
        if p is None:
            return x, attention_mask
        p = p.to(x.dtype).expand(x.size(0), -1, -1)  # (n or B, n, d) -> (B, n, d); params stay fp32
        mask = attention_mask.new_ones(p.shape[:2]) if prompt_mask is None else prompt_mask
        return torch.cat([p, x], 1), torch.cat([mask.to(attention_mask.dtype), attention_mask], 1)

    def forward(self, input_ids, attention_mask, **kwargs):
        inputs_embeds, mask = self.embed(input_ids, attention_mask)
        return self.t5(inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, **kwargs):
        inputs_embeds, mask = self.embed(input_ids, attention_mask)
        return self.t5.generate(inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs)


# --- stateless dropout: every dropout site of T5 (nn.Dropout, the attention weights') draws its ---
# mask from a hash of (run seed, step, example index, site, position from the example's own first
# token, feature), folded as JAX folds keys: a run's masks depend on its own data only, alone or
# packed, on any number of ranks, resumed or not.
STATELESS = "ept_stateless"
_context = []  # while a forward runs: [keys (B,), encoder offsets (B,) or None, {site: calls}]


def _mix(x):
    """A 32-bit integer hash, elementwise, on int64 tensors holding values in [0, 2^32)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


def example_keys(seeds, steps, indices, device=None):
    """(B,) keys of the examples: their run's seed and step, their index in the training split."""
    fold = lambda h, v: _mix(h ^ (torch.as_tensor(v, dtype=torch.long) & 0xFFFFFFFF))
    return fold(fold(fold(0, seeds), steps), indices).to(device)


@contextlib.contextmanager
def dropout_keys(keys, encoder_offset=None):
    """The examples' keys (B,) for the forwards inside; `encoder_offset` (B,): a pack's pad rows."""
    _context.append([keys, encoder_offset, {}])
    try:
        yield
    finally:
        _context.pop()


def _drop(x, p, site, sides):
    """x (B, ...) times a mask: U[0, 1) hashed from the keys, site, call, each axis's index."""
    if not _context:
        raise RuntimeError("stateless dropout in training mode needs model.dropout_keys(...)")
    keys, offset, calls = _context[-1]
    call = calls[site] = calls.get(site, -1) + 1  # T5Stack.dropout serves twice per forward
    b, dims = x.size(0), x.dim() - 1
    h = _mix(keys ^ (site * 16 + call)).view(b, *[1] * dims)
    for k, (size, side) in enumerate(zip(x.shape[1:], sides), 1):
        index = torch.arange(size, device=x.device).view(-1, *[1] * (dims - k))  # at axis k
        if side == "encoder" and offset is not None:
            index = (index - offset.to(x.device).view(b, *[1] * dims)) & 0xFFFFFFFF
        h = _mix(h ^ index)
    return x * ((h >> 8).float() * 2.0 ** -24 >= p).to(x.dtype) / (1 - p)  # kept: U >= p


class StatelessDropout(nn.Dropout):
    """T5's nn.Dropout at one site, its mask from the examples' keys (above)."""
    def __init__(self, p, site, sides):
        super().__init__(p)
        self.ept_site, self.ept_sides = site, sides

    def forward(self, x):
        return _drop(x, self.p, self.ept_site, self.ept_sides) if self.training and self.p else x


def _attention(module, query, key, value, attention_mask, scaling, dropout, position_bias, **kw):
    """transformers' T5 eager attention (T5 passes all three), its weights' dropout stateless."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1)  # (B, H, L_query, L_key); dropout 0.0 when not training
    weights = _drop(weights, dropout, module.ept_site, module.ept_sides) if dropout else weights
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def stateless_dropout(t5):
    """Give every dropout site of `t5` a stateless mask (above); returns t5."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(STATELESS, _attention)
    AttentionMaskInterface.register(STATELESS, eager_mask)
    for site, (name, module) in enumerate(list(t5.named_modules())):
        side = "decoder" if name.startswith("decoder") else "encoder"
        if type(module) is nn.Dropout:  # (B, L, D): the positions of `side`, then features
            parent, _, attr = name.rpartition(".")
            setattr(t5.get_submodule(parent), attr, StatelessDropout(module.p, site, (side, None)))
        elif hasattr(module, "relative_attention_num_buckets"):  # T5Attention: (B, H, L_q, L_k)
            key_side = "encoder" if name.endswith("EncDecAttention") else side
            module.ept_site, module.ept_sides = site, (None, side, key_side)
    t5.set_attn_implementation(STATELESS)  # the encoder's and decoder's configs too
    return t5


def count_trainable(module):
    """Trainable parameters; parameters() yields a shared tensor (T5's tied embedding) once."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

