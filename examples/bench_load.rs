//! Load time and peak memory of a full-size SDXL single file, with and without a DMD2-shaped
//! LoRA merged at load (random weights; no download).
//!
//! cargo run --release --example bench_load -- [--dir DIR] [--dtype f16|bf16|f32] [--runs N] [--keep]
//!     [--prepare-only] [--dry-run] [--ops DIR]
//!
//! Writes, into DIR (default: a folder under the system temp dir, removed afterwards unless
//! --keep), an original-layout SDXL checkpoint with SDXL base's shapes and random f16 weights
//! (~6.9 GB, through `checkpoint::writer`) and a LoRA shaped like `dmd2_sdxl_4step_lora_fp16`
//! (kohya names from diffusers modules, rank 64, alpha 8, f16, on the same 788 UNet modules).
//! Each measurement runs in a fresh child process (`checkpoint::open` → `lora::apply_loras`
//! → `Pipeline::load` in the chosen dtype on the CPU), which prints its wall time and peak
//! resident memory (VmHWM); variants alternate so both see the same page-cache state. The
//! file is read once before timing so both variants start from a warm page cache.
//!
//! `--ops DIR` (with files kept by `--keep`) times the steps of merging every patched weight:
//! `ComponentWeights::load`'s step-by-step path against `weights::merge_patches`.

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Shape, Tensor};
use dmd2::checkpoint::writer::{TensorEntry, assembled_shape, write_streaming};
use dmd2::clip::ClipTextModel;
use dmd2::config::{VaeConfig, sdxl_base};
use dmd2::keymap::{Component, canonical_maps, original_tensors};
use dmd2::unet::UNet;
use dmd2::vae::VaeDecoder;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

// ---------------------------------------------------------------------------------------
// Shapes of every tensor, recorded from the model constructors
// ---------------------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<HashMap<String, Vec<usize>>>>);

impl candle_nn::var_builder::SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut m) = self.0.lock() {
            m.insert(name.to_string(), s.dims().to_vec());
        }
        // A broadcast scalar: the shape without the memory.
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!("no shape for {name}")))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

fn record(
    build: impl FnOnce(candle_nn::VarBuilder<'static>) -> Result<()>,
) -> Result<HashMap<String, Vec<usize>>> {
    let r = Recorder::default();
    let vb = candle_nn::VarBuilder::from_backend(Box::new(r.clone()), DType::F32, Device::Cpu);
    build(vb)?;
    let m =
        r.0.lock()
            .map_err(|_| anyhow::anyhow!("recorder poisoned"))?;
    Ok(m.clone())
}

/// The VAE encoder is not built by the pipeline; its shapes follow the configuration.
fn vae_encoder_shapes(
    c: &VaeConfig,
    decoder: &HashMap<String, Vec<usize>>,
) -> HashMap<String, Vec<usize>> {
    let mut m = HashMap::new();
    let ch = &c.block_out_channels;
    let last = ch[ch.len() - 1];
    let mut conv = |name: String, o: usize, i: usize, k: usize| {
        m.insert(format!("{name}.weight"), vec![o, i, k, k]);
        m.insert(format!("{name}.bias"), vec![o]);
    };
    conv("encoder.conv_in".into(), ch[0], 3, 3);
    let mut cin = ch[0];
    for (i, &out) in ch.iter().enumerate() {
        for j in 0..c.layers_per_block {
            let p = format!("encoder.down_blocks.{i}.resnets.{j}");
            conv(format!("{p}.conv1"), out, cin, 3);
            conv(format!("{p}.conv2"), out, out, 3);
            if cin != out {
                conv(format!("{p}.conv_shortcut"), out, cin, 1);
            }
            cin = out;
        }
        if i + 1 < ch.len() {
            conv(
                format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                out,
                out,
                3,
            );
        }
    }
    conv("encoder.conv_out".into(), 2 * c.latent_channels, last, 3);
    conv(
        "quant_conv".into(),
        2 * c.latent_channels,
        2 * c.latent_channels,
        1,
    );
    for (i, &out) in ch.iter().enumerate() {
        let mut cin = if i == 0 { ch[0] } else { ch[i - 1] };
        for j in 0..c.layers_per_block {
            let p = format!("encoder.down_blocks.{i}.resnets.{j}");
            m.insert(format!("{p}.norm1.weight"), vec![cin]);
            m.insert(format!("{p}.norm1.bias"), vec![cin]);
            m.insert(format!("{p}.norm2.weight"), vec![out]);
            m.insert(format!("{p}.norm2.bias"), vec![out]);
            cin = out;
        }
    }
    m.insert("encoder.conv_norm_out.weight".into(), vec![last]);
    m.insert("encoder.conv_norm_out.bias".into(), vec![last]);
    // The mid block is the decoder's, under the encoder's name.
    for (k, v) in decoder {
        if let Some(rest) = k.strip_prefix("decoder.mid_block.") {
            m.insert(format!("encoder.mid_block.{rest}"), v.clone());
        }
    }
    m
}

/// diffusers name → shape for each component of SDXL base.
fn sdxl_shapes() -> Result<HashMap<Component, HashMap<String, Vec<usize>>>> {
    let unet = record(|vb| {
        UNet::new(&sdxl_base::unet(), vb)
            .map(|_| ())
            .map_err(anyhow::Error::from)
    })?;
    let te = record(|vb| {
        ClipTextModel::new(&sdxl_base::text_encoder(), vb)
            .map(|_| ())
            .map_err(anyhow::Error::from)
    })?;
    let te2 = record(|vb| {
        ClipTextModel::new(&sdxl_base::text_encoder_2(), vb)
            .map(|_| ())
            .map_err(anyhow::Error::from)
    })?;
    let mut vae = record(|vb| {
        VaeDecoder::new(&sdxl_base::vae(), vb)
            .map(|_| ())
            .map_err(anyhow::Error::from)
    })?;
    let enc = vae_encoder_shapes(&sdxl_base::vae(), &vae);
    vae.extend(enc);
    Ok(HashMap::from([
        (Component::Unet, unet),
        (Component::TextEncoder, te),
        (Component::TextEncoder2, te2),
        (Component::Vae, vae),
    ]))
}

// ---------------------------------------------------------------------------------------
// Random data, fast (uniform with the wanted standard deviation)
// ---------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn tensor(&mut self, shape: &[usize], std: f32, dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let a = std * 3f32.sqrt();
        let v: Vec<f32> = (0..n)
            .map(|_| ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a)
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
    }
}

fn std_for(name: &str, shape: &[usize]) -> (f32, f32) {
    // (mean, std)
    if shape.len() >= 2 {
        let fan_in: usize = shape[1..].iter().product();
        (0.0, 1.0 / (fan_in.max(1) as f32).sqrt())
    } else if name.ends_with("bias") {
        (0.0, 0.01)
    } else {
        (1.0, 0.01)
    }
}

/// Every tensor of the original-layout file, with SDXL base's shapes, as f16.
fn model_entries() -> Result<Vec<TensorEntry>> {
    let shapes = sdxl_shapes()?;
    let maps = canonical_maps(
        &sdxl_base::unet(),
        &sdxl_base::text_encoder(),
        &sdxl_base::text_encoder_2(),
        &sdxl_base::vae(),
    )?;
    let originals = original_tensors(&maps);
    let mut entries = Vec::new();
    for t in &originals {
        let parts: Vec<Vec<usize>> = t
            .parts
            .iter()
            .map(|p| {
                shapes[&t.component]
                    .get(p)
                    .cloned()
                    .with_context(|| format!("no shape for {} {p}", t.component))
            })
            .collect::<Result<_>>()?;
        let shape = assembled_shape(t.assemble, &parts).context("assemble")?;
        entries.push(TensorEntry {
            name: t.key.clone(),
            dtype: DType::F16,
            shape,
        });
    }
    Ok(entries)
}

fn write_model(path: &Path) -> Result<()> {
    let entries = model_entries()?;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_streaming(path, &[], &entries, &meta, |_, e| {
        let (mean, std) = std_for(&e.name, &e.shape);
        Ok(rng
            .tensor(&e.shape, std, DType::F32)?
            .affine(1.0, mean as f64)?
            .to_dtype(e.dtype)?)
    })
}

const DMD2_PATTERNS: [&str; 13] = [
    ".to_q",
    ".to_k",
    ".to_v",
    ".to_out.0",
    ".proj_in",
    ".proj_out",
    ".ff.net.0.proj",
    ".ff.net.2",
    ".conv1",
    ".conv2",
    ".conv_shortcut",
    ".time_emb_proj",
    "samplers.0.conv",
];

/// The DMD2 LoRA's modules (diffusers names) with their weight shapes.
fn dmd2_modules() -> Result<Vec<(String, Vec<usize>)>> {
    let shapes = sdxl_shapes()?;
    let mut modules: Vec<(String, Vec<usize>)> = shapes[&Component::Unet]
        .iter()
        .filter_map(|(k, s)| {
            let m = k.strip_suffix(".weight")?;
            (m.starts_with("down_blocks")
                || m.starts_with("mid_block")
                || m.starts_with("up_blocks"))
            .then_some(())?;
            DMD2_PATTERNS
                .iter()
                .any(|p| m.ends_with(p))
                .then(|| (m.to_string(), s.clone()))
        })
        .collect();
    modules.sort();
    Ok(modules)
}

fn write_lora(path: &Path, rank: usize) -> Result<usize> {
    let modules = dmd2_modules()?;
    let mut entries = Vec::new();
    for (m, s) in &modules {
        let k = format!("lora_unet_{}", m.replace('.', "_"));
        let mut down = vec![rank, s[1]];
        let mut up = vec![s[0], rank];
        if s.len() == 4 {
            down.extend_from_slice(&s[2..]);
            up.extend_from_slice(&[1, 1]);
        }
        entries.push(TensorEntry {
            name: format!("{k}.alpha"),
            dtype: DType::F16,
            shape: vec![],
        });
        entries.push(TensorEntry {
            name: format!("{k}.lora_down.weight"),
            dtype: DType::F16,
            shape: down,
        });
        entries.push(TensorEntry {
            name: format!("{k}.lora_up.weight"),
            dtype: DType::F16,
            shape: up,
        });
    }
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_streaming(path, &[], &entries, &meta, |_, e| {
        if e.name.ends_with(".alpha") {
            return Ok(Tensor::new(8f32, &Device::Cpu)?.to_dtype(DType::F16)?);
        }
        let fan_in: usize = e.shape[1..].iter().product();
        let std = if e.name.ends_with("lora_up.weight") {
            0.01
        } else {
            1.0 / (fan_in as f32).sqrt()
        };
        rng.tensor(&e.shape, std, e.dtype)
    })?;
    Ok(modules.len())
}

// ---------------------------------------------------------------------------------------
// Measurement (child process)
// ---------------------------------------------------------------------------------------

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn child(model: &Path, lora: Option<&Path>, dtype: DType) -> Result<()> {
    let t0 = Instant::now();
    let mut parts = dmd2::checkpoint::open(model)?;
    let t_open = t0.elapsed().as_secs_f64();
    let specs: Vec<dmd2::lora::LoraSpec> = lora
        .map(|p| dmd2::lora::LoraSpec {
            path: p.to_path_buf(),
            weight: 1.0,
        })
        .into_iter()
        .collect();
    let reports = dmd2::lora::apply_loras(&mut parts, &specs)?;
    let t_plan = t0.elapsed().as_secs_f64() - t_open;
    for r in &reports {
        eprintln!("{r}");
    }
    // bf16 is the CPU bf16 path (bf16 matrices, f32 vectors, f32 text encoders); f16 keeps
    // everything in f16 as on a GPU.
    use dmd2::precision::{Precision, RunPrecision};
    let precision = match dtype {
        DType::BF16 => RunPrecision {
            unet: Precision::CPU_BF16,
            vae: Precision::CPU_BF16,
            text: Precision::F32,
        },
        // As `gen --dtype f32` resolves it (f16-stored linear weights kept in f16).
        DType::F32 => RunPrecision::resolve(dmd2::precision::DtypeChoice::F32, &Device::Cpu, 0)?,
        d => {
            let p = Precision::uniform(d);
            RunPrecision {
                unet: p,
                vae: p,
                text: p,
            }
        }
    };
    let p = dmd2::pipeline::Pipeline::load(parts, &Device::Cpu, precision)?;
    let total = t0.elapsed().as_secs_f64();
    println!(
        "{{\"total_s\": {total:.3}, \"open_s\": {t_open:.3}, \"lora_plan_s\": {t_plan:.3}, \"vmhwm_kb\": {}, \"vmrss_kb\": {}}}",
        status_kb("VmHWM:"),
        status_kb("VmRSS:")
    );
    drop(p);
    Ok(())
}

/// Where the merge time goes: the steps of `ComponentWeights::load` for every patched weight.
fn ops(model: &Path, lora: &Path, dtype: DType) -> Result<()> {
    let mut parts = dmd2::checkpoint::open(model)?;
    let spec = dmd2::lora::LoraSpec {
        path: lora.to_path_buf(),
        weight: 1.0,
    };
    dmd2::lora::apply_loras(&mut parts, &[spec])?;
    let w = &parts.unet;
    let mut t = [0f64; 7];
    let names = [
        "load_raw",
        "to f32",
        "delta",
        "× multiplier",
        "add",
        "to dtype",
        "fused (weights::merge_patches)",
    ];
    let mut elems = 0usize;
    let mut scratch = dmd2::weights::MergeScratch::default();
    for (name, patches) in &w.patches {
        let mut lap = Instant::now();
        let mut tick = |i: usize, t: &mut [f64; 7]| {
            t[i] += lap.elapsed().as_secs_f64();
            lap = Instant::now();
        };
        let raw = w.load_raw(name)?;
        tick(0, &mut t);
        let mut x = raw.to_dtype(DType::F32)?;
        tick(1, &mut t);
        elems += x.elem_count();
        for p in patches {
            let d = p.delta.delta(x.dims())?;
            tick(2, &mut t);
            let d = (d * p.multiplier as f64)?;
            tick(3, &mut t);
            x = (x + d)?;
            tick(4, &mut t);
        }
        let out = x.to_dtype(dtype)?;
        tick(5, &mut t);
        let fused = dmd2::weights::merge_patches(&raw, patches, dtype, &mut scratch)?;
        tick(6, &mut t);
        if fused.dims() != out.dims() {
            bail!("{name}: fused shape differs");
        }
    }
    println!("{} patched weights, {elems} elements:", w.patches.len());
    for (n, v) in names.iter().zip(t) {
        println!("  {n:30} {v:7.2} s");
    }
    println!(
        "  current path total             {:7.2} s",
        t[1..6].iter().sum::<f64>()
    );
    Ok(())
}

fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        "f32" => DType::F32,
        other => bail!("--dtype {other}: f16, bf16 or f32"),
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let dtype = parse_dtype(get("--dtype").as_deref().unwrap_or("f16"))?;
    if let Some(model) = get("--child") {
        return child(
            Path::new(&model),
            get("--lora").as_deref().map(Path::new),
            dtype,
        );
    }
    if args.iter().any(|a| a == "--dry-run") {
        let e = model_entries()?;
        let params: usize = e.iter().map(|e| e.shape.iter().product::<usize>()).sum();
        println!(
            "{} tensors, {params} parameters, {:.2} GB as f16",
            e.len(),
            params as f64 * 2e-9
        );
        let m = dmd2_modules()?;
        println!("{} DMD2 LoRA modules", m.len());
        return Ok(());
    }
    if let Some(dir) = get("--ops") {
        let dir = PathBuf::from(dir);
        return ops(
            &dir.join("sdxl_base_random_f16.safetensors"),
            &dir.join("dmd2_shaped_lora_r64_f16.safetensors"),
            dtype,
        );
    }
    let keep = args.iter().any(|a| a == "--keep");
    let runs: usize = get("--runs")
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(2)
        .max(1);
    let dir = get("--dir")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("dmd2-bench-load"));
    std::fs::create_dir_all(&dir)?;
    let model = dir.join("sdxl_base_random_f16.safetensors");
    let lora = dir.join("dmd2_shaped_lora_r64_f16.safetensors");
    if !model.exists() {
        let t = Instant::now();
        write_model(&model)?;
        let size = std::fs::metadata(&model)?.len();
        println!(
            "wrote {} ({:.2} GB) in {:.1} s",
            model.display(),
            size as f64 / 1e9,
            t.elapsed().as_secs_f64()
        );
    }
    if !lora.exists() {
        let t = Instant::now();
        let n = write_lora(&lora, 64)?;
        let size = std::fs::metadata(&lora)?.len();
        println!(
            "wrote {} ({n} modules, {:.0} MB) in {:.1} s",
            lora.display(),
            size as f64 / 1e6,
            t.elapsed().as_secs_f64()
        );
    }
    if args.iter().any(|a| a == "--prepare-only") {
        return Ok(());
    }
    // Warm the page cache with both files so that neither variant pays the disk.
    for f in [&model, &lora] {
        let t = Instant::now();
        let mut r = std::fs::File::open(f)?;
        std::io::copy(&mut r, &mut std::io::sink())?;
        println!("read {} in {:.1} s", f.display(), t.elapsed().as_secs_f64());
    }
    let exe = std::env::current_exe()?;
    let dtype_arg = get("--dtype").unwrap_or_else(|| "f16".into());
    let mut results: BTreeMap<&str, Vec<serde_json::Value>> = BTreeMap::new();
    for run in 0..runs {
        for (name, with_lora) in [("no LoRA", false), ("DMD2-shaped LoRA", true)] {
            let mut cmd = Command::new(&exe);
            cmd.args(["--child", &model.to_string_lossy(), "--dtype", &dtype_arg]);
            if with_lora {
                cmd.args(["--lora", &lora.to_string_lossy()]);
            }
            let out = cmd.output()?;
            if !out.status.success() {
                bail!("child failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let line = String::from_utf8_lossy(&out.stdout);
            let v: serde_json::Value = serde_json::from_str(line.trim())
                .with_context(|| format!("child output {line}"))?;
            println!(
                "run {run} {name}: {v}  {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            results.entry(name).or_default().push(v);
        }
    }
    let summary = |name: &str| -> (f64, f64) {
        let rs = &results[name];
        let mut t: Vec<f64> = rs.iter().filter_map(|v| v["total_s"].as_f64()).collect();
        let mut m: Vec<f64> = rs.iter().filter_map(|v| v["vmhwm_kb"].as_f64()).collect();
        (median(&mut t), median(&mut m) / 1024.0 / 1024.0)
    };
    let (t0, m0) = summary("no LoRA");
    let (t1, m1) = summary("DMD2-shaped LoRA");
    println!(
        "\nload of SDXL base shapes (f16 single file) into {dtype:?} on the CPU, median of {runs}:"
    );
    println!("  no LoRA:          {t0:.2} s, peak RSS {m0:.2} GiB");
    println!("  DMD2-shaped LoRA: {t1:.2} s, peak RSS {m1:.2} GiB");
    println!(
        "  merge adds {:.2} s ({:+.1}%) and {:.2} GiB ({:+.1}%) peak RSS",
        t1 - t0,
        (t1 / t0 - 1.0) * 100.0,
        m1 - m0,
        (m1 / m0 - 1.0) * 100.0
    );
    if !keep {
        std::fs::remove_file(&model)?;
        std::fs::remove_file(&lora)?;
        let _ = std::fs::remove_dir(&dir);
    }
    Ok(())
}
