//! Images to start from: the init image of img2img and inpainting and its mask, read as
//! diffusers' `VaeImageProcessor` reads them (PIL's Lanczos resize, bit for bit; `[-1, 1]`
//! pixels; masks to grey with PIL's weights, binarized at 0.5).

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use std::io::Read;
use std::path::Path;

/// Largest init image or mask side, in pixels (a decoded 16k² RGB image is 768 MB).
pub const MAX_SIDE: usize = 16384;
/// Largest image file read, in bytes.
const MAX_FILE_BYTES: u64 = 512 << 20;

/// An 8-bit image, row-major, `channels` bytes per pixel.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

/// Reads a PNG, JPEG or WebP file (`-`: stdin) as RGB (alpha dropped, as PIL's
/// `convert("RGB")`). Errors name the file.
pub fn read_rgb(path: &Path) -> Result<Pixels> {
    let name = if path.as_os_str() == "-" {
        "stdin".to_string()
    } else {
        path.display().to_string()
    };
    let bytes = if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut buf)
            .with_context(|| format!("{name}: cannot read"))?;
        buf
    } else {
        crate::files::read_bounded(path, MAX_FILE_BYTES)?
    };
    if bytes.len() as u64 > MAX_FILE_BYTES {
        bail!("{name}: larger than {} MiB", MAX_FILE_BYTES >> 20);
    }
    let format = image::guess_format(&bytes)
        .ok()
        .filter(|f| {
            matches!(
                f,
                image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP
            )
        })
        .with_context(|| format!("{name}: not a PNG, JPEG or WebP image"))?;
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(&bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE as u32);
    limits.max_image_height = Some(MAX_SIDE as u32);
    limits.max_alloc = Some(4 << 30);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| anyhow::anyhow!("{name}: cannot decode the image: {e}"))?;
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    if w == 0 || h == 0 {
        bail!("{name}: the image is empty");
    }
    Ok(Pixels {
        width: w,
        height: h,
        channels: 3,
        data: rgb.into_raw(),
    })
}

/// An image file as a run read it: its pixels and the sha256 of its bytes' pixels.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// As the user named it (`-` for stdin).
    pub path: std::path::PathBuf,
    pub pixels: Pixels,
    /// sha256 of the decoded RGB pixels (hex), so the PNG names exactly what it started from.
    pub sha256: String,
}

impl Loaded {
    pub fn read(path: &Path) -> Result<Self> {
        let pixels = read_rgb(path)?;
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update((pixels.width as u64).to_le_bytes());
        h.update((pixels.height as u64).to_le_bytes());
        h.update(&pixels.data);
        let sha256 = h
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        Ok(Self {
            path: path.to_path_buf(),
            pixels,
            sha256,
        })
    }
}

/// The size an init image makes when none is asked for: its own, rounded down to a multiple
/// of `multiple` (diffusers' `get_default_height_width`).
pub fn default_size(p: &Pixels, multiple: usize) -> Result<(usize, usize)> {
    let (w, h) = (p.width - p.width % multiple, p.height - p.height % multiple);
    if w == 0 || h == 0 {
        bail!(
            "the image is {}x{}, smaller than {multiple} pixels",
            p.width,
            p.height
        );
    }
    Ok((w, h))
}

/// The pipeline's start: the image resized (PIL Lanczos) to `width`×`height` in [-1, 1],
/// and the mask likewise resized from grey and binarized at 0.5 (diffusers' mask processor).
/// Inpainting's optional finish, off by default (diffusers does neither unless asked).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MaskFinish {
    /// Gaussian blur radius of the mask in pixels (PIL's `GaussianBlur`, as diffusers'
    /// `mask_processor.blur` and A1111's mask blur), before it is resized and binarized.
    pub blur: f32,
    /// Paste the init image back outside the (blurred) mask after decoding, blending by the
    /// mask's grey levels (A1111's finish for inpainting).
    pub paste_back: bool,
}

pub fn prepare(
    image: &Loaded,
    mask: Option<&Loaded>,
    width: usize,
    height: usize,
    strength: f64,
    finish: MaskFinish,
) -> Result<crate::img2img::InitImage> {
    let img = image
        .pixels
        .resize_lanczos(width, height)
        .to_tensor(true, &Device::Cpu)?;
    let mut paste_alpha = None;
    let mask = match mask {
        None => None,
        Some(m) => {
            if (m.pixels.width, m.pixels.height) != (image.pixels.width, image.pixels.height) {
                bail!(
                    "{}: the mask is {}x{}, the image {}x{}",
                    m.path.display(),
                    m.pixels.width,
                    m.pixels.height,
                    image.pixels.width,
                    image.pixels.height
                );
            }
            let mut grey = m.pixels.to_grey();
            if finish.blur > 0.0 {
                grey = grey.gaussian_blur(finish.blur);
            }
            let t = grey
                .resize_lanczos(width, height)
                .to_tensor(false, &Device::Cpu)?;
            if finish.paste_back {
                paste_alpha = Some(t.clone());
            }
            Some(t.ge(0.5f32)?.to_dtype(candle_core::DType::F32)?)
        }
    };
    Ok(crate::img2img::InitImage {
        image: img,
        mask,
        strength,
        paste_alpha,
    })
}

impl Pixels {
    /// PIL's `convert("L")`: `(19595 R + 38470 G + 7471 B + 2^15) >> 16`.
    pub fn to_grey(&self) -> Pixels {
        assert_eq!(self.channels, 3);
        let data = self
            .data
            .chunks_exact(3)
            .map(|p| {
                ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16)
                    as u8
            })
            .collect();
        Pixels {
            width: self.width,
            height: self.height,
            channels: 1,
            data,
        }
    }

    /// PIL's `Image.resize((width, height), Image.LANCZOS)` (a copy when the size is the
    /// same): separable Lanczos-3, horizontal pass first into 8 bits, then vertical, with
    /// PIL's 22-bit fixed-point coefficients and rounding.
    pub fn resize_lanczos(&self, width: usize, height: usize) -> Pixels {
        let mut img = self.clone();
        let need_h = width != self.width;
        let need_v = height != self.height;
        let (bounds_v, ksize_v, kk_v) = coefficients(self.height, height);
        let (first, last) = (
            bounds_v[0].0,
            bounds_v[height - 1].0 + bounds_v[height - 1].1,
        );
        let mut bounds_v = bounds_v;
        if need_h {
            // Only the source rows the vertical pass reads.
            for b in &mut bounds_v {
                b.0 -= first;
            }
            let (bounds_h, ksize_h, kk_h) = coefficients(self.width, width);
            let c = self.channels;
            let rows = last - first;
            let mut out = vec![0u8; width * rows * c];
            for y in 0..rows {
                let src = &self.data[(y + first) * self.width * c..][..self.width * c];
                for (x, &(xmin, n)) in bounds_h.iter().enumerate() {
                    let k = &kk_h[x * ksize_h..][..n];
                    for ch in 0..c {
                        let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                        for (i, &kv) in k.iter().enumerate() {
                            ss += src[(xmin + i) * c + ch] as i64 * kv as i64;
                        }
                        out[(y * width + x) * c + ch] = clip8(ss);
                    }
                }
            }
            img = Pixels {
                width,
                height: rows,
                channels: c,
                data: out,
            };
        }
        if need_v {
            let c = img.channels;
            let w = img.width;
            let mut out = vec![0u8; w * height * c];
            for (y, &(ymin, n)) in bounds_v.iter().enumerate() {
                let k = &kk_v[y * ksize_v..][..n];
                for x in 0..w * c {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &kv) in k.iter().enumerate() {
                        ss += img.data[(ymin + i) * w * c + x] as i64 * kv as i64;
                    }
                    out[y * w * c + x] = clip8(ss);
                }
            }
            img = Pixels {
                width: w,
                height,
                channels: c,
                data: out,
            };
        }
        img
    }

    /// PIL's `ImageFilter.GaussianBlur(radius)`: three box blurs per axis (horizontal, then
    /// vertical) of the extended box radius PIL derives from the radius, in its 8-bit
    /// fixed-point arithmetic.
    pub fn gaussian_blur(&self, radius: f32) -> Pixels {
        let r = box_radius(radius, 3);
        let (w, h, c) = (self.width, self.height, self.channels);
        let mut out = self.data.clone();
        let mut line = Vec::new();
        let mut blurred = Vec::new();
        // Rows, then columns (PIL transposes; the same arithmetic on each line).
        for (len, count, step_of) in [
            (
                w,
                h,
                Box::new(move |l: usize, i: usize| l * w + i) as Box<dyn Fn(usize, usize) -> usize>,
            ),
            (h, w, Box::new(move |l: usize, i: usize| i * w + l)),
        ] {
            for l in 0..count {
                for ch in 0..c {
                    line.clear();
                    line.extend((0..len).map(|i| out[step_of(l, i) * c + ch]));
                    for _ in 0..3 {
                        box_blur_line(&line, &mut blurred, r);
                        std::mem::swap(&mut line, &mut blurred);
                    }
                    for (i, &v) in line.iter().enumerate() {
                        out[step_of(l, i) * c + ch] = v;
                    }
                }
            }
        }
        Pixels {
            width: w,
            height: h,
            channels: c,
            data: out,
        }
    }

    /// diffusers' image preprocessing: `[1, C, H, W]` f32, `x / 255` (×2 − 1 when
    /// `normalize`).
    pub fn to_tensor(&self, normalize: bool, device: &Device) -> Result<Tensor> {
        let (w, h, c) = (self.width, self.height, self.channels);
        let mut v = vec![0f32; w * h * c];
        for ch in 0..c {
            for i in 0..w * h {
                let x = self.data[i * c + ch] as f32 / 255.0;
                v[ch * w * h + i] = if normalize { 2.0 * x - 1.0 } else { x };
            }
        }
        Ok(Tensor::from_vec(v, (1, c, h, w), device)?)
    }
}

/// PIL's `_gaussian_blur_radius`: the box radius whose `passes` box blurs have the
/// Gaussian's variance (Gwosdek et al., extended box).
fn box_radius(radius: f32, passes: u32) -> f32 {
    // C's float variables, with the double constants it mixes in.
    let sigma2 = radius * radius / passes as f32;
    let big_l = (12.0 * sigma2 as f64 + 1.0).sqrt() as f32;
    let l = ((big_l as f64 - 1.0) / 2.0).floor() as f32;
    let a =
        (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2) / (6.0 * (sigma2 - (l + 1.0) * (l + 1.0)));
    l + a
}

/// PIL's `ImagingLineBoxBlur8`: a box of `radius` (integer part full, fractional part on the
/// two far pixels), edges extended, 24-bit fixed point.
fn box_blur_line(line: &[u8], out: &mut Vec<u8>, float_radius: f32) {
    let n = line.len();
    out.clear();
    out.resize(n, 0);
    let radius = float_radius as usize;
    let ww = ((1u32 << 24) as f32 / (float_radius * 2.0 + 1.0)) as u32;
    let fw = ((1u32 << 24) - (radius as u32 * 2 + 1) * ww) / 2;
    let last = n - 1;
    // Pixel i of the line extended by its edge values.
    let px = |i: isize| line[i.clamp(0, last as isize) as usize] as u32;
    for (x, o) in out.iter_mut().enumerate() {
        let x = x as isize;
        let r = radius as isize;
        let mut acc = 0u32;
        for k in x - r..=x + r {
            acc += px(k);
        }
        let bulk = acc * ww + (px(x - r - 1) + px(x + r + 1)) * fw;
        *o = ((bulk + (1 << 23)) >> 24) as u8;
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

fn lanczos(x: f64) -> f64 {
    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            1.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
    }
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for `in_size` → `out_size`: per
/// output pixel its first input pixel and tap count, and `ksize` fixed-point taps each.
fn coefficients(in_size: usize, out_size: usize) -> (Vec<(usize, usize)>, usize, Vec<i32>) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 3.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = lanczos((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for x in 0..n {
            let v = if ww != 0.0 { k[x] / ww } else { k[x] };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, n));
    }
    (bounds, ksize, kk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_a_copy_and_constant_images_stay_constant() {
        let p = Pixels {
            width: 5,
            height: 3,
            channels: 3,
            data: (0..45).map(|i| (i * 5) as u8).collect(),
        };
        assert_eq!(p.resize_lanczos(5, 3), p);
        let flat = Pixels {
            width: 17,
            height: 9,
            channels: 1,
            data: vec![200; 17 * 9],
        };
        for (w, h) in [(8, 8), (40, 3), (17, 20), (1, 1)] {
            let r = flat.resize_lanczos(w, h);
            assert_eq!((r.width, r.height), (w, h));
            assert!(r.data.iter().all(|&v| v == 200), "{w}x{h}");
        }
    }

    #[test]
    fn grey_uses_pils_weights() {
        let p = Pixels {
            width: 3,
            height: 1,
            channels: 3,
            data: vec![255, 0, 0, 0, 255, 0, 10, 20, 30],
        };
        // PIL: Image.new("RGB", …).convert("L") gives 76, 150, 18.
        assert_eq!(p.to_grey().data, vec![76, 150, 18]);
    }
}
