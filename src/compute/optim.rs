//! Fused in-place AdamW.
//!
//! candle-nn's `AdamW` allocates ~14 temporaries per parameter and step. Here
//! the moments live in plain `Vec<f32>` and one pass per parameter updates m, v and the weight
//! in place, with gradient clipping folded in as a scale on g. Off the CPU the same arithmetic
//! runs as tensor ops on moments that stay on the device; they reach host memory only when a
//! checkpoint asks for them.
use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, Device, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How many times weights have changed in this process: every optimizer step and every
/// [`weights_changed`] call bumps it. Values derived from weights and kept between calls (the
/// bf16 working copies of `model.dtype = "bf16"`) compare it to know they are stale; the CPU
/// update runs in place, so the tensors themselves show no change.
static WEIGHTS_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The current weights generation (see [`weights_changed`]).
pub fn weights_generation() -> u64 {
    WEIGHTS_GENERATION.load(std::sync::atomic::Ordering::SeqCst)
}

/// Records that weights were written in place (an optimizer step, a load into existing Vars).
pub fn weights_changed() {
    WEIGHTS_GENERATION.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

pub struct AdamW {
    params: Vec<(String, Var)>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Moments of parameters on an accelerator (m, v), authoritative over `m`/`v` when set.
    dev_mv: Vec<Option<(Tensor, Tensor)>>,
    pub hp: AdamWParams,
    /// Number of updates taken (bias correction uses it).
    pub t: u64,
}

/// Chunk size for rayon: large enough that scheduling is negligible.
const CHUNK: usize = 1 << 14;

struct FusedUpdate<'a> {
    m: Mutex<&'a mut [f32]>,
    v: Mutex<&'a mut [f32]>,
    lr: f32,
    decay: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    bc1: f32,
    bc2: f32,
    gscale: f32,
}

fn contiguous<'a>(s: &'a [f32], l: &Layout) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("fused adamw: non-contiguous tensor"),
    }
}

impl InplaceOp2 for FusedUpdate<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("fused adamw: f32 parameters and gradients only")
        };
        let (a, b) = l1
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("non-contiguous param".into()))?;
        let p = &mut p[a..b];
        let g = contiguous(g, l2)?;
        let mut m = self
            .m
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        let mut v = self
            .v
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        if p.len() != g.len() || m.len() != p.len() {
            candle_core::bail!(
                "fused adamw: length mismatch p {} g {} m {}",
                p.len(),
                g.len(),
                m.len()
            );
        }
        let u = self;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| {
                for i in 0..p.len() {
                    let gi = g[i] * u.gscale;
                    m[i] = u.b1 * m[i] + (1.0 - u.b1) * gi;
                    v[i] = u.b2 * v[i] + (1.0 - u.b2) * gi * gi;
                    let mh = m[i] / u.bc1;
                    let vh = v[i] / u.bc2;
                    p[i] = p[i] * u.decay - u.lr * mh / (vh.sqrt() + u.eps);
                }
            });
        Ok(())
    }
}

impl AdamW {
    pub fn new(params: &[(String, Var)], hp: AdamWParams) -> Self {
        let m = params
            .iter()
            .map(|(_, p)| vec![0.0; p.elem_count()])
            .collect();
        let v = params
            .iter()
            .map(|(_, p)| vec![0.0; p.elem_count()])
            .collect();
        AdamW {
            params: params.to_vec(),
            m,
            v,
            dev_mv: vec![None; params.len()],
            hp,
            t: 0,
        }
    }

    /// `acc` plus `more`, parameter by parameter (gradient accumulation over micro-batches).
    pub fn add_grads(&self, mut acc: GradStore, more: &GradStore) -> Result<GradStore> {
        for (_, p) in &self.params {
            let Some(g) = more.get(p.as_tensor()) else {
                continue;
            };
            let sum = match acc.get(p.as_tensor()) {
                Some(a) => (a + g)?,
                None => g.clone(),
            };
            acc.insert(p.as_tensor(), sum);
        }
        Ok(acc)
    }

    /// Global L2 norm of the gradients of all parameters.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sq = 0.0f64;
        for (_, p) in &self.params {
            if let Some(g) = grads.get(p.as_tensor()) {
                sq += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(sq.sqrt())
    }

    /// One update with learning rate `lr`; gradients are multiplied by `grad_scale` first
    /// (the clipping coefficient). Parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.t += 1;
        let hp = self.hp;
        let bc1 = 1.0 - hp.beta1.powi(self.t as i32);
        let bc2 = 1.0 - hp.beta2.powi(self.t as i32);
        for (i, (_, p)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            let g = g.contiguous()?;
            match p.device() {
                Device::Cpu => {
                    let op = FusedUpdate {
                        m: Mutex::new(&mut self.m[i][..]),
                        v: Mutex::new(&mut self.v[i][..]),
                        lr: lr as f32,
                        decay: (1.0 - lr * hp.weight_decay) as f32,
                        b1: hp.beta1 as f32,
                        b2: hp.beta2 as f32,
                        eps: hp.eps as f32,
                        bc1: bc1 as f32,
                        bc2: bc2 as f32,
                        gscale: grad_scale as f32,
                    };
                    p.as_tensor().inplace_op2(&g, &op)?;
                }
                dev => {
                    // Accelerator path: the same arithmetic with tensor ops, moments kept on
                    // the device (copied from host memory once, after creation or a resume).
                    let (m, v) = match self.dev_mv[i].take() {
                        Some(mv) => mv,
                        None => {
                            let shape = p.shape().clone();
                            (
                                Tensor::from_slice(&self.m[i], &shape, dev)?,
                                Tensor::from_slice(&self.v[i], &shape, dev)?,
                            )
                        }
                    };
                    let g = (g * grad_scale)?;
                    let m = ((m * hp.beta1)? + (&g * (1.0 - hp.beta1))?)?;
                    let v = ((v * hp.beta2)? + (g.sqr()? * (1.0 - hp.beta2))?)?;
                    let upd = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + hp.eps)?)?;
                    let newp = ((p.as_tensor() * (1.0 - lr * hp.weight_decay))? - (upd * lr)?)?;
                    p.set(&newp)?;
                    self.dev_mv[i] = Some((m, v));
                }
            }
        }
        weights_changed();
        Ok(())
    }

    /// Moments as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`) for checkpoints.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (n, p)) in self.params.iter().enumerate() {
            let (m, v) = match &self.dev_mv[i] {
                Some((m, v)) => (m.to_device(&Device::Cpu)?, v.to_device(&Device::Cpu)?),
                None => (
                    Tensor::from_slice(&self.m[i], p.shape(), &Device::Cpu)?,
                    Tensor::from_slice(&self.v[i], p.shape(), &Device::Cpu)?,
                ),
            };
            out.insert(format!("{n}.exp_avg"), m);
            out.insert(format!("{n}.exp_avg_sq"), v);
        }
        Ok(out)
    }

    /// Restores moments saved by [`state_tensors`](Self::state_tensors); every parameter must be present.
    pub fn load_state(
        &mut self,
        mut st: HashMap<String, Tensor>,
        t: u64,
        source: &std::path::Path,
    ) -> Result<()> {
        for (i, (n, p)) in self.params.iter().enumerate() {
            for (suffix, slot) in [("exp_avg", &mut self.m[i]), ("exp_avg_sq", &mut self.v[i])] {
                let key = format!("{n}.{suffix}");
                let t = st.remove(&key).ok_or_else(|| {
                    Error::checkpoint(source, format!("missing optimizer tensor `{key}`"))
                })?;
                if t.elem_count() != p.elem_count() {
                    return Err(Error::checkpoint(
                        source,
                        format!(
                            "optimizer tensor `{key}` has {} elements, expected {}",
                            t.elem_count(),
                            p.elem_count()
                        ),
                    ));
                }
                *slot = t
                    .flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1()?;
            }
        }
        self.dev_mv.iter_mut().for_each(|mv| *mv = None);
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_reference_adamw() {
        // Two steps of AdamW on p = [1, -2] with g = [0.5, -1] then [0.1, 0.2], lr 0.1, wd 0.01,
        // checked against the textbook update written out below in f64.
        let dev = Device::Cpu;
        let p = Var::from_slice(&[1.0f32, -2.0], 2, &dev).unwrap();
        let params = vec![("p".to_string(), p.clone())];
        let hp = AdamWParams {
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = AdamW::new(&params, hp);
        let (mut m, mut v, mut x) = ([0.0f64; 2], [0.0f64; 2], [1.0f64, -2.0]);
        for (t, g) in [[0.5f64, -1.0], [0.1, 0.2]].iter().enumerate() {
            let loss = (p.as_tensor() * Tensor::new(&[g[0] as f32, g[1] as f32], &dev).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, 0.1, 1.0).unwrap();
            let t = t as i32 + 1;
            for i in 0..2 {
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                x[i] = x[i] * (1.0 - 0.1 * 0.01) - 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got: Vec<f32> = p.as_tensor().to_vec1().unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - x[i]).abs() < 1e-5, "{got:?} vs {x:?}");
        }
    }
}
