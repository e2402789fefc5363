//! The Llama/Mistral decoder: a training forward built only from differentiable candle ops, and an
//! inference forward with a KV cache that uses candle's fused kernels (which have no backward). Both run
//! attention through the fused op of [`crate::attention`] (it has a backward).

use anyhow::{ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::VarBuilder;
use std::sync::{Arc, Mutex};

use super::attention::{attention, AttentionMask};
use super::config::LlamaConfig;
use super::lora::{Adapter, LoraPair, LINEAR_MODULES};

/// Which op set a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Only ops with a backward (training).
    Differentiable,
    /// Fused kernels allowed (inference).
    Fast,
}

/// Optional inputs of a forward pass beyond the token ids. Attention is always causal (with Mistral's
/// sliding window when configured); these narrow it further.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// Per-token positions, shape `(batch, seq)`, dtype u32. Default: `past_len + 0..seq` for every row.
    /// Packed documents reset positions per document; left-padded prompts start counting at the first token.
    pub position_ids: Option<Tensor>,
    /// `(batch, past_len + seq)` u8 over every key position, cached ones included: 1 for a real token, 0 for
    /// padding that no query may attend. A query that sees no key at all (itself padding) gets a zero
    /// attention output. See [`key_mask`].
    pub key_mask: Option<Tensor>,
    /// `(batch, past_len + seq)` u32: the document of every position; a token attends only to earlier
    /// tokens of its own document (packed rows; use with [`packed_position_ids`]).
    pub document_ids: Option<Tensor>,
}

/// Per-layer keys and values of the tokens seen so far, for incremental decoding, as
/// `(batch, positions, kv_heads, head_dim)` (the layout the projections produce and the attention reads in
/// place). Buffers are preallocated
/// and written in place (growing by the first chunk's length + `headroom` when full), so a decoding step
/// does not copy the whole cache. Not `Clone`: clones would share and overwrite the same buffers.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<candle_nn::kv_cache::KvCache>>,
    headroom: usize,
    len: usize,
}

impl KvCache {
    /// An empty cache for a model of `num_layers` layers, with room for 256 tokens beyond the first chunk.
    pub fn new(num_layers: usize) -> Self {
        Self::with_headroom(num_layers, 256)
    }

    /// An empty cache whose buffers hold the first chunk plus `headroom` tokens before growing
    /// (e.g. the prompt length plus `max_new_tokens`).
    pub fn with_headroom(num_layers: usize, headroom: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            headroom: headroom.max(1),
            len: 0,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cache of a batch-1 prefix repeated `n` times along the batch, so `n` continuations of the same
    /// context can be decoded together (evaluation's shared-prefix scoring).
    pub fn repeat_batch(&self, n: usize) -> Result<KvCache> {
        let mut out = KvCache::with_headroom(self.layers.len(), self.headroom);
        for (slot, layer) in out.layers.iter_mut().zip(&self.layers) {
            if let Some(cache) = layer {
                if let (Some(k), Some(v)) = (cache.k()?, cache.v()?) {
                    let (k, v) = (
                        k.repeat((n, 1, 1, 1))?.contiguous()?,
                        v.repeat((n, 1, 1, 1))?.contiguous()?,
                    );
                    let mut repeated =
                        candle_nn::kv_cache::KvCache::new(1, k.dim(1)? + self.headroom);
                    repeated.append(&k, &v)?;
                    *slot = Some(repeated);
                }
            }
        }
        out.len = self.len;
        Ok(out)
    }

    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let seq = k.dim(1)?;
        let cache = self.layers[layer]
            .get_or_insert_with(|| candle_nn::kv_cache::KvCache::new(1, seq + self.headroom));
        let out = cache.append(&k, &v)?;
        if layer + 1 == self.layers.len() {
            self.len += seq;
        }
        Ok(out)
    }
}

/// One decoder layer's weights.
#[derive(Debug, Clone)]
struct Layer {
    input_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    post_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// A Llama/Mistral causal language model. Its tensors are whatever the [`VarBuilder`] returned: trainable
/// [`candle_core::Var`]s when built from a `VarMap`, plain tensors when built for inference.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    inv_freq: Tensor,
    /// Dtype the forward computes in; weights of another dtype are cast at use (differentiably).
    compute: DType,
    /// LoRA factors applied beside the linear layers (`x Wᵀ + scaling · dropout(x) Aᵀ Bᵀ`), if any.
    adapters: Option<Arc<ModelAdapters>>,
    /// Training-time settings of the differentiable forward: dropout seed, activation checkpointing.
    training: Arc<TrainingState>,
}

/// The LoRA factors of every decoder layer and how they apply.
#[derive(Debug)]
struct ModelAdapters {
    /// Per layer, per linear module in [`LINEAR_MODULES`] order.
    layers: Vec<[Option<LoraPair>; 7]>,
    scaling: f64,
    dropout: f64,
}

/// What the differentiable forward does beyond the maths: set by the trainer, shared by clones.
#[derive(Debug, Default)]
struct TrainingState {
    /// Seed of the adapters' dropout masks for the next micro-batch (none: no dropout).
    dropout_seed: Mutex<Option<u64>>,
    /// Whether each decoder layer keeps only its input and recomputes itself in the backward pass.
    checkpointing: std::sync::atomic::AtomicBool,
    /// Gradients of the checkpointed layers' weights, found while recomputing them in the backward pass.
    recomputed: Mutex<GradStore>,
}

impl Llama {
    /// Builds the model from `vb` (names as in Hugging Face checkpoints, e.g. `model.layers.0.mlp.up_proj.weight`).
    /// With `tie_word_embeddings` the head is the embedding matrix itself.
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let shapes = cfg.weight_shapes();
        let get = |name: &str| -> Result<Tensor> {
            let shape = &shapes
                .iter()
                .find(|(n, _)| n == name)
                .expect("known weight")
                .1;
            vb.get(shape.as_slice(), name)
                .with_context(|| format!("weight {name}"))
        };
        let embed = get("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}.weight");
            layers.push(Layer {
                input_norm: get(&p("input_layernorm"))?,
                q: get(&p("self_attn.q_proj"))?,
                k: get(&p("self_attn.k_proj"))?,
                v: get(&p("self_attn.v_proj"))?,
                o: get(&p("self_attn.o_proj"))?,
                post_norm: get(&p("post_attention_layernorm"))?,
                gate: get(&p("mlp.gate_proj"))?,
                up: get(&p("mlp.up_proj"))?,
                down: get(&p("mlp.down_proj"))?,
            });
        }
        let norm = get("model.norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            get("lm_head.weight")?
        };
        let inv_freq = rope_inv_freq(cfg, embed.device())?;
        let compute = embed.dtype();
        Ok(Llama {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            compute,
            adapters: None,
            training: Arc::default(),
        })
    }

    /// The same model with LoRA `adapter` applied beside its linear layers. The adapter's tensors are used
    /// as they are: variables when training the adapter (the base weights then stay frozen), plain tensors
    /// for inference. Every adapted module must be a linear layer of this model.
    pub fn with_adapter(mut self, adapter: &Adapter) -> Result<Self> {
        let mut layers: Vec<[Option<LoraPair>; 7]> =
            (0..self.layers.len()).map(|_| Default::default()).collect();
        for (module, pair) in &adapter.layers {
            let rest = module
                .strip_prefix("model.layers.")
                .with_context(|| format!("adapter module {module:?} is not in a decoder layer"))?;
            let (index, name) = rest
                .split_once('.')
                .with_context(|| format!("adapter module {module:?}"))?;
            let index: usize = index
                .parse()
                .with_context(|| format!("adapter module {module:?}: layer index"))?;
            let last = name.rsplit('.').next().unwrap_or(name);
            let slot = LINEAR_MODULES
                .iter()
                .position(|m| *m == last)
                .with_context(|| format!("adapter module {module:?} is not a linear layer"))?;
            ensure!(
                index < layers.len(),
                "adapter module {module:?}: the model has {} layers",
                layers.len()
            );
            layers[index][slot] = Some(pair.clone());
        }
        self.adapters = Some(Arc::new(ModelAdapters {
            layers,
            scaling: adapter.settings.scaling(),
            dropout: adapter.settings.dropout,
        }));
        Ok(self)
    }

    /// Whether training forwards keep only each decoder layer's input and recompute the layer in the
    /// backward pass (activation checkpointing): activation memory falls from every intermediate of every
    /// layer to one hidden state per layer, for one more forward pass of compute. Collect the weights'
    /// gradients after `backward()` with [`Llama::merge_recomputed_grads`].
    pub fn with_checkpointing(self, on: bool) -> Self {
        self.training
            .checkpointing
            .store(on, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// The seed of the adapters' dropout masks in the following training forwards (`None`: no dropout).
    /// Masks are a function of the seed, the layer and the module, so a resumed run and a recomputed
    /// (checkpointed) layer draw the same ones.
    pub fn set_dropout_seed(&self, seed: Option<u64>) {
        *self
            .training
            .dropout_seed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = seed;
    }

    /// Adds the gradients found while recomputing checkpointed layers in the last backward pass to `grads`
    /// (they are not in the store `backward()` returns) and forgets them.
    pub fn merge_recomputed_grads(&self, grads: &mut GradStore) -> Result<()> {
        let recomputed = std::mem::take(
            &mut *self
                .training
                .recomputed
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        grads.extend(recomputed)?;
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Device of the weights.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Dtype of the weights (see [`Llama::compute_dtype`] for the computation's).
    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// A detached copy of the model in another dtype and/or on another device (e.g. a bf16 inference copy
    /// of f32 training variables); the copy shares nothing with the original's variables.
    pub fn to(&self, dtype: DType, device: &Device) -> Result<Llama> {
        let conv = |t: &Tensor| -> Result<Tensor> {
            Ok(t.to_device(device)?.to_dtype(dtype)?.detach().copy()?)
        };
        let embed = conv(&self.embed)?;
        let layers = self
            .layers
            .iter()
            .map(|w| {
                Ok(Layer {
                    input_norm: conv(&w.input_norm)?,
                    q: conv(&w.q)?,
                    k: conv(&w.k)?,
                    v: conv(&w.v)?,
                    o: conv(&w.o)?,
                    post_norm: conv(&w.post_norm)?,
                    gate: conv(&w.gate)?,
                    up: conv(&w.up)?,
                    down: conv(&self.cw(&w.down)?)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if self.cfg.tie_word_embeddings {
            embed.clone()
        } else {
            conv(&self.lm_head)?
        };
        let adapters = match &self.adapters {
            None => None,
            Some(a) => {
                let copy =
                    |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?.detach().copy()?) };
                let layers = a
                    .layers
                    .iter()
                    .map(|pairs| {
                        let mut out: [Option<LoraPair>; 7] = Default::default();
                        for (slot, pair) in pairs.iter().enumerate() {
                            if let Some(p) = pair {
                                out[slot] = Some(LoraPair {
                                    a: copy(&p.a)?,
                                    b: copy(&p.b)?,
                                });
                            }
                        }
                        Ok(out)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(Arc::new(ModelAdapters {
                    layers,
                    scaling: a.scaling,
                    dropout: a.dropout,
                }))
            }
        };
        Ok(Llama {
            cfg: self.cfg.clone(),
            norm: conv(&self.norm)?,
            inv_freq: self.inv_freq.to_device(device)?,
            embed,
            layers,
            lm_head,
            compute: dtype,
            adapters,
            training: Arc::default(),
        })
    }

    /// The same model computing in `dtype` while its weights keep their own dtype: e.g. f32 master
    /// variables with a bf16 forward. Weights are cast at use with a differentiable op, so gradients
    /// still reach the f32 variables.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute = dtype;
        self
    }

    /// Dtype the forward computes in (by default the weights' dtype).
    pub fn compute_dtype(&self) -> DType {
        self.compute
    }

    /// A weight in the compute dtype.
    fn cw(&self, t: &Tensor) -> Result<Tensor> {
        Ok(if t.dtype() == self.compute {
            t.clone()
        } else {
            t.to_dtype(self.compute)?
        })
    }

    /// Every weight by its checkpoint name (the tied head is not listed separately).
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (l, w) in self.layers.iter().enumerate() {
            let p = |s: &str| format!("model.layers.{l}.{s}.weight");
            out.push((p("input_layernorm"), w.input_norm.clone()));
            out.push((p("self_attn.q_proj"), w.q.clone()));
            out.push((p("self_attn.k_proj"), w.k.clone()));
            out.push((p("self_attn.v_proj"), w.v.clone()));
            out.push((p("self_attn.o_proj"), w.o.clone()));
            out.push((p("post_attention_layernorm"), w.post_norm.clone()));
            out.push((p("mlp.gate_proj"), w.gate.clone()));
            out.push((p("mlp.up_proj"), w.up.clone()));
            out.push((p("mlp.down_proj"), w.down.clone()));
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), self.lm_head.clone()));
        }
        out
    }

    /// Training forward: logits `(batch, seq, vocab)` for `input_ids` `(batch, seq)` (u32), using only ops
    /// that propagate gradients. Default mask: causal (plus Mistral's sliding window when configured).
    pub fn forward_train(&self, input_ids: &Tensor, opts: &ForwardOptions) -> Result<Tensor> {
        self.head(&self.run(input_ids, opts, None, Path::Differentiable, false)?)
    }

    /// Inference forward over new tokens, appending their keys/values to `cache`. Positions default to
    /// `cache.len() + 0..seq`. With `last_only`, logits are computed for the last position only
    /// (`(batch, 1, vocab)`), which is what decoding needs.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        cache: &mut KvCache,
        opts: &ForwardOptions,
        last_only: bool,
    ) -> Result<Tensor> {
        ensure!(
            cache.layers.len() == self.layers.len(),
            "KV cache has the wrong number of layers"
        );
        self.head(&self.run(input_ids, opts, Some(cache), Path::Fast, last_only)?)
    }

    /// Inference forward without a cache (fused kernels, no gradient), all positions.
    pub fn forward(&self, input_ids: &Tensor, opts: &ForwardOptions) -> Result<Tensor> {
        self.head(&self.forward_hidden(input_ids, opts)?)
    }

    /// Training forward up to the final norm: hidden states `(batch, seq, hidden)`, differentiable. Apply
    /// [`Llama::head`] to the rows that need logits (e.g. completion tokens only) to save memory.
    pub fn forward_hidden_train(
        &self,
        input_ids: &Tensor,
        opts: &ForwardOptions,
    ) -> Result<Tensor> {
        self.run(input_ids, opts, None, Path::Differentiable, false)
    }

    /// Inference forward up to the final norm (fused kernels, no gradient): `(batch, seq, hidden)`.
    pub fn forward_hidden(&self, input_ids: &Tensor, opts: &ForwardOptions) -> Result<Tensor> {
        self.run(input_ids, opts, None, Path::Fast, false)
    }

    /// The language-model head: logits `(..., vocab)` from final hidden states `(..., hidden)`.
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        linear(&hidden.to_dtype(self.compute)?, &self.cw(&self.lm_head)?)
    }

    /// Final hidden states (after the last norm).
    fn run(
        &self,
        input_ids: &Tensor,
        opts: &ForwardOptions,
        mut cache: Option<&mut KvCache>,
        path: Path,
        last_only: bool,
    ) -> Result<Tensor> {
        let (b, s) = input_ids
            .dims2()
            .context("input_ids must be (batch, seq)")?;
        ensure!(s > 0, "empty input");
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let dev = self.device();
        let positions = match &opts.position_ids {
            Some(p) => {
                ensure!(
                    p.dims() == [b, s],
                    "position_ids must have shape ({b}, {s}), got {:?}",
                    p.dims()
                );
                p.to_dtype(DType::F32)?
            }
            None => Tensor::arange(past as f32, (past + s) as f32, dev)?
                .unsqueeze(0)?
                .repeat((b, 1))?,
        };
        let (cos, sin) = self.rope_tables(&positions, path)?;
        let mask = AttentionMask {
            key_mask: opts.key_mask.clone(),
            document_ids: opts.document_ids.clone(),
            ..AttentionMask::causal(self.cfg.sliding_window, past)
        };
        mask.check(b, s, past + s, dev)
            .context("ForwardOptions (key_mask / document_ids cover past + seq positions)")?;
        let mut x = self
            .embed
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, s, self.cfg.hidden_size))?
            .to_dtype(self.compute)?;
        let checkpointing = path == Path::Differentiable
            && cache.is_none()
            && self
                .training
                .checkpointing
                .load(std::sync::atomic::Ordering::Relaxed);
        let dropout_seed = match path {
            Path::Differentiable => *self
                .training
                .dropout_seed
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
            Path::Fast => None,
        };
        for (l, w) in self.layers.iter().enumerate() {
            let step = LayerStep {
                index: l,
                weights: w.clone(),
                adapters: self
                    .adapters
                    .as_ref()
                    .map(|a| (a.layers[l].clone(), a.scaling, a.dropout)),
                dropout_seed,
                compute: self.compute,
                eps: self.cfg.rms_norm_eps,
                heads: (
                    self.cfg.num_attention_heads,
                    self.cfg.num_kv_heads(),
                    self.cfg.head_dim(),
                ),
                cos: cos.clone(),
                sin: sin.clone(),
                mask: mask.clone(),
                path,
            };
            x = if checkpointing {
                step.checkpointed(&x, self.training.clone())?
            } else {
                step.forward(&x, cache.as_deref_mut())?
            };
        }
        if last_only {
            x = x.narrow(1, s - 1, 1)?;
        }
        rms_norm(&x, &self.cw(&self.norm)?, self.cfg.rms_norm_eps, path)
    }

    /// cos/sin of shape `(batch, seq, head_dim)` (differentiable path) or `(batch, seq, head_dim/2)` (fused rope).
    fn rope_tables(&self, positions: &Tensor, path: Path) -> Result<(Tensor, Tensor)> {
        let freqs = positions
            .unsqueeze(2)?
            .broadcast_mul(&self.inv_freq.reshape((1, 1, ()))?)?;
        let freqs = match path {
            Path::Differentiable => Tensor::cat(&[&freqs, &freqs], 2)?,
            Path::Fast => freqs,
        };
        let dtype = self.compute;
        Ok((
            freqs.cos()?.to_dtype(dtype)?.contiguous()?,
            freqs.sin()?.to_dtype(dtype)?.contiguous()?,
        ))
    }
}

/// One decoder layer's forward with everything it needs owned (cheap tensor clones), so that a checkpointed
/// layer can run itself again in the backward pass.
#[derive(Clone)]
struct LayerStep {
    index: usize,
    weights: Layer,
    /// The layer's LoRA factors by module, the scaling and the dropout probability.
    adapters: Option<([Option<LoraPair>; 7], f64, f64)>,
    dropout_seed: Option<u64>,
    compute: DType,
    eps: f64,
    /// (query heads, key/value heads, head dim).
    heads: (usize, usize, usize),
    cos: Tensor,
    sin: Tensor,
    mask: AttentionMask,
    path: Path,
}

impl LayerStep {
    /// A weight in the compute dtype.
    fn cw(&self, t: &Tensor) -> Result<Tensor> {
        Ok(if t.dtype() == self.compute {
            t.clone()
        } else {
            t.to_dtype(self.compute)?
        })
    }

    /// `x` through the decoder layer: attention and MLP blocks with their residuals.
    fn forward(&self, x: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let w = &self.weights;
        let h = rms_norm(x, &self.cw(&w.input_norm)?, self.eps, self.path)?;
        let a = self.attention(&h, cache)?;
        let x = (x + a)?;
        let h = rms_norm(&x, &self.cw(&w.post_norm)?, self.eps, self.path)?;
        let gate = self.project(4, &h, &w.gate)?;
        let up = self.project(5, &h, &w.up)?;
        let m = self.project(6, &(candle_nn::ops::silu(&gate)? * up)?, &w.down)?;
        Ok((x + m)?)
    }

    fn attention(&self, x: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let w = &self.weights;
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = self.heads;
        // (batch, seq, heads, head_dim) straight from the projections: no transposes anywhere.
        let q = self.project(0, x, &w.q)?.reshape((b, s, nh, hd))?;
        let k = self.project(1, x, &w.k)?.reshape((b, s, nkv, hd))?;
        let v = self.project(2, x, &w.v)?.reshape((b, s, nkv, hd))?;
        let (cos, sin) = (&self.cos, &self.sin);
        let (q, k) = match self.path {
            Path::Differentiable => (
                rope_differentiable(&q, cos, sin)?,
                rope_differentiable(&k, cos, sin)?,
            ),
            Path::Fast => (
                candle_nn::rotary_emb::rope_thd(&q.contiguous()?, cos, sin)?,
                candle_nn::rotary_emb::rope_thd(&k.contiguous()?, cos, sin)?,
            ),
        };
        let (k, v) = match cache {
            Some(c) => c.append(self.index, k, v)?,
            None => (k, v),
        };
        let out = attention(&q, &k, &v, &self.mask, 1.0 / (hd as f64).sqrt())?;
        self.project(3, &out.reshape((b, s, nh * hd))?, &w.o)
    }

    /// Linear module `slot` (of [`LINEAR_MODULES`]) applied to `x`: `x Wᵀ`, plus the adapter's
    /// `scaling · dropout(x) Aᵀ Bᵀ` when the module has one — computed in f32 (the adapter's dtype, as PEFT
    /// does) and added in the compute dtype.
    fn project(&self, slot: usize, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let base = linear(x, &self.cw(w)?)?;
        let Some((pairs, scaling, dropout)) = &self.adapters else {
            return Ok(base);
        };
        let Some(pair) = &pairs[slot] else {
            return Ok(base);
        };
        let mut xa = x.to_dtype(pair.a.dtype())?;
        if let (Some(seed), true) = (self.dropout_seed, *dropout > 0.0) {
            let mask_seed = splitmix64(seed ^ ((self.index as u64) << 8) ^ slot as u64);
            xa = xa.broadcast_mul(&dropout_keep_mask(
                xa.dims(),
                *dropout,
                mask_seed,
                xa.device(),
            )?)?;
        }
        let delta =
            (linear(&linear(&xa, &pair.a)?, &pair.b)? * *scaling)?.to_dtype(base.dtype())?;
        Ok((base + delta)?)
    }

    /// The layer as one node of the training graph that keeps only its input: the forward runs without a
    /// graph, and the backward pass runs the layer again (same dropout masks) to get the input's gradient;
    /// the weights' gradients found there go to `training.recomputed`.
    fn checkpointed(self, x: &Tensor, training: Arc<TrainingState>) -> Result<Tensor> {
        let out = self.forward(&x.detach(), None)?.detach().contiguous()?;
        // candle records (and later runs the backward of) an op only when an argument is tracked; with a
        // frozen base the first layer's input is not, so make it a variable (its gradient is not used).
        let x = if x.track_op() {
            x.clone()
        } else {
            Var::from_tensor(x)?.as_tensor().clone()
        };
        Ok(x.apply_op2_arc(
            &out,
            Arc::new(Box::new(RecomputedLayer {
                step: self,
                training,
            })),
        )?)
    }
}

/// The graph node of a checkpointed layer: forward = the output computed without a graph; backward = the
/// layer recomputed with one.
struct RecomputedLayer {
    step: LayerStep,
    training: Arc<TrainingState>,
}

impl candle_core::CustomOp2 for RecomputedLayer {
    fn name(&self) -> &'static str {
        "checkpointed-decoder-layer"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        out: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((out.try_clone(layout)?, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        out: &candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((out.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _out: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let input = Var::from_tensor(&x.detach())?;
        let y = self
            .step
            .forward(input.as_tensor(), None)
            .map_err(candle_core::Error::wrap)?;
        let surrogate = (y * grad_res.detach())?.sum_all()?;
        let mut grads = surrogate.backward()?;
        let dx = grads.remove(input.as_tensor());
        self.training
            .recomputed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(grads)?;
        Ok((dx, None))
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An f32 dropout mask of `dims` (kept entries `1 / (1 − p)`, dropped ones 0), a function of `seed` only:
/// drawn from a counter-based hash on the CPU, from the device's generator seeded with `seed` elsewhere.
fn dropout_keep_mask(dims: &[usize], p: f64, seed: u64, device: &Device) -> Result<Tensor> {
    let keep = 1.0 - p;
    let scale = (1.0 / keep) as f32;
    if device.is_cpu() {
        use rayon::prelude::*;
        let n: usize = dims.iter().product();
        let threshold = (keep * u32::MAX as f64) as u32;
        let mut mask = vec![0f32; n];
        mask.par_chunks_mut(4096)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (i, m) in chunk.iter_mut().enumerate() {
                    let r = (splitmix64(seed ^ (c * 4096 + i) as u64) >> 32) as u32;
                    *m = if r < threshold { scale } else { 0.0 };
                }
            });
        return Ok(Tensor::from_vec(mask, dims, device)?);
    }
    device.set_seed(seed)?;
    let u = Tensor::rand(0f32, 1f32, dims, device)?;
    Ok((u.ge(p)?.to_dtype(DType::F32)? * scale as f64)?)
}

/// The dtype normalisation runs in: f32 for half types, else the input's own.
fn upcast(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// `x @ w.T` for `x` of shape `(..., in)` and `w` of shape `(out, in)`.
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::Linear::new(w.clone(), None).forward(x)?)
}

/// RMSNorm as in transformers: normalise in f32, cast back, then scale.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, path: Path) -> Result<Tensor> {
    match path {
        Path::Fast => Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            weight,
            eps as f32,
        )?),
        Path::Differentiable => {
            let dtype = x.dtype();
            let xf = x.to_dtype(upcast(dtype))?;
            let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
            let normed = xf.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
            Ok(normed.to_dtype(dtype)?.broadcast_mul(weight)?)
        }
    }
}

/// `x * cos + rotate_half(x) * sin` for `x` of shape `(batch, seq, heads, head_dim)` and `cos`/`sin` of
/// shape `(batch, seq, head_dim)`.
fn rope_differentiable(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let cos = cos.unsqueeze(2)?;
    let sin = sin.unsqueeze(2)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// RoPE inverse frequencies `1 / theta^(2i/d)`, computed in f32 like transformers.
fn rope_inv_freq(cfg: &LlamaConfig, dev: &Device) -> Result<Tensor> {
    let d = cfg.head_dim();
    let base = cfg.rope_base() as f32;
    let inv: Vec<f32> = (0..d)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / d as f32))
        .collect();
    Ok(Tensor::from_vec(inv, d / 2, dev)?)
}

/// The `(batch, keys)` u8 key mask of [`ForwardOptions::key_mask`] from per-row flags (true = real token).
pub fn key_mask(key_valid: &[Vec<bool>], dev: &Device) -> Result<Tensor> {
    let b = key_valid.len();
    ensure!(b > 0, "empty batch");
    let t = key_valid[0].len();
    let mut data = Vec::with_capacity(b * t);
    for row in key_valid {
        ensure!(row.len() == t, "key_valid rows must all have length {t}");
        data.extend(row.iter().map(|&v| v as u8));
    }
    Ok(Tensor::from_vec(data, (b, t), dev)?)
}

/// The `(batch, seq)` u32 document ids of [`ForwardOptions::document_ids`] from per-row ids.
pub fn document_ids(doc_ids: &[Vec<u32>], dev: &Device) -> Result<Tensor> {
    let b = doc_ids.len();
    ensure!(b > 0, "empty batch");
    let s = doc_ids[0].len();
    ensure!(
        doc_ids.iter().all(|d| d.len() == s),
        "doc_ids rows must all have length {s}"
    );
    Ok(Tensor::from_vec(doc_ids.concat(), (b, s), dev)?)
}

/// Position ids `(batch, seq)` that restart at 0 at every document boundary of packed rows.
pub fn packed_position_ids(doc_ids: &[Vec<u32>], dev: &Device) -> Result<Tensor> {
    let b = doc_ids.len();
    ensure!(b > 0, "empty batch");
    let s = doc_ids[0].len();
    let mut data = Vec::with_capacity(b * s);
    for docs in doc_ids {
        ensure!(docs.len() == s, "doc_ids rows must all have length {s}");
        let mut pos = 0u32;
        for i in 0..s {
            if i > 0 && docs[i] != docs[i - 1] {
                pos = 0;
            }
            data.push(pos);
            pos += 1;
        }
    }
    Ok(Tensor::from_vec(data, (b, s), dev)?)
}
