//! A pyramid layer as one BigTIFF (issue 40): Debian's OpenSlide 3.4.1 and libvips read what
//! `mira_gpu_worker::layer` writes, with every level and the MPP as recorded, and OpenSlide's
//! pixels are exactly the stored tiles' (padding cropped).

use std::path::PathBuf;
use std::process::Command;

use mira_gpu_worker::layer::{self, TILE};
use mira_gpu_worker::slide::{Reader, Slide};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mira-layer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A smooth image with edges and colour, so JPEG has something to do everywhere.
fn picture(w: u32, h: u32) -> Vec<u8> {
    let mut px = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f64 / w as f64, y as f64 / h as f64);
            let ring = (((fx - 0.5).powi(2) + (fy - 0.4).powi(2)).sqrt() * 40.0).sin();
            px.push((200.0 + 40.0 * ring) as u8);
            px.push((120.0 + 90.0 * fx * (1.0 - fy)) as u8);
            px.push(if (x / 37 + y / 53) % 2 == 0 { 190 } else { 150 });
        }
    }
    px
}

/// The stored tiles of one level decoded with libjpeg-turbo and put together, cropped to the level.
fn decoded_level(file: &std::path::Path, index: &layer::LevelIndex) -> Vec<u8> {
    let bytes = std::fs::read(file).unwrap();
    let (w, h) = (index.width as usize, index.height as usize);
    let mut out = vec![0u8; w * h * 3];
    let mut d = turbojpeg::Decompressor::new().unwrap();
    for row in 0..index.rows {
        for col in 0..index.columns {
            let i = (row * index.columns + col) as usize;
            let (at, n) = (index.offsets[i] as usize, index.byte_counts[i] as usize);
            let jpeg = &bytes[at..at + n];
            let head = d.read_header(jpeg).unwrap();
            assert_eq!(
                (head.width, head.height),
                (TILE as usize, TILE as usize),
                "every tile is 256×256"
            );
            let mut tile = vec![0u8; 256 * 256 * 3];
            d.decompress(
                jpeg,
                turbojpeg::Image {
                    pixels: tile.as_mut_slice(),
                    width: 256,
                    pitch: 256 * 3,
                    height: 256,
                    format: turbojpeg::PixelFormat::RGB,
                },
            )
            .unwrap();
            for y in 0..256usize {
                let gy = row as usize * 256 + y;
                if gy >= h {
                    break;
                }
                let x0 = col as usize * 256;
                let n = 256.min(w - x0);
                out[(gy * w + x0) * 3..(gy * w + x0 + n) * 3].copy_from_slice(&tile[y * 256 * 3..(y * 256 + n) * 3]);
            }
        }
    }
    out
}

#[test]
fn openslide_and_vips_read_the_layer_as_written() {
    let dir = scratch("synthetic");
    let (w, h) = (1000u32, 700u32);
    let path = dir.join("slide.tiff");
    let file = std::fs::File::create(&path).unwrap();
    let (_, index) = layer::write_rgb(
        std::io::BufWriter::new(file),
        &picture(w, h),
        w,
        h,
        80,
        Some((0.499, 0.499)),
    )
    .unwrap();
    assert_eq!(index.len(), 11, "1000×700 down to 1×1");

    // OpenSlide 3.4.1 (generic TIFF), not the direct TIFF path: what QuPath and others see.
    let slide = Slide::open_with(&path, Reader::OpenSlide).unwrap();
    assert_eq!(slide.property("openslide.vendor").as_deref(), Some("generic-tiff"));
    let levels = slide.levels().to_vec();
    assert_eq!(levels.len(), index.len(), "every level in the main IFD chain");
    for (i, (lw, lh, _)) in levels.iter().enumerate() {
        assert_eq!(
            (*lw, *lh),
            (u64::from(index[i].width), u64::from(index[i].height)),
            "level {i}"
        );
    }
    // The MPP through the tiff.* properties (OpenSlide 3.4.1 sets no openslide.mpp-x here).
    assert_eq!(slide.property("tiff.ResolutionUnit").as_deref(), Some("centimeter"));
    let per_cm: f64 = slide.property("tiff.XResolution").unwrap().parse().unwrap();
    assert!((1e4 / per_cm - 0.499).abs() < 1e-6, "{per_cm} px/cm");

    // Every level OpenSlide reads is exactly the stored tiles, padding cropped.
    for (i, ix) in index.iter().enumerate() {
        let read = slide
            .read_rgb_openslide(i as u32, 0, 0, u64::from(ix.width), u64::from(ix.height))
            .unwrap();
        assert!(
            read == decoded_level(&path, ix),
            "level {i} differs from its stored tiles"
        );
    }

    // libvips: the dimensions and one page per level.
    let vips = |field: &str| {
        let out = Command::new("vipsheader")
            .args(["-f", field])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(vips("width"), "1000");
    assert_eq!(vips("height"), "700");
    assert_eq!(vips("n-pages"), "11");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A layer made the way the pipeline makes it: the DeepZoom builder on a 256-pixel grid without
/// overlap, its levels side by side, tiles encoded on many threads. OpenSlide reads every level
/// as exactly the stored tiles, the index the manifest will carry points at each level's
/// arrays, and two runs give the same bytes whatever order the threads finished in.
#[test]
fn the_pipelines_builder_writes_a_layer_openslide_reads_the_same_every_time() {
    use mira_gpu_worker::deepzoom::{Builder, Geometry};
    let dir = scratch("builder");
    let (w, h) = (1300u32, 900u32);
    let px = picture(w, h);
    let make = |name: &str| {
        let path = dir.join(name);
        let writer = layer::LayerWriter::new(Vec::new(), w, h, Some((0.25, 0.25))).unwrap();
        let sink = layer::LayerSink::new(writer, 85);
        let mut b = Builder::new(Geometry::new(u64::from(w), u64::from(h), TILE, 0), &sink);
        // Bands of 100 rows: tile rows complete in the middle of a band and across bands.
        for band in px.chunks((w * 3 * 100) as usize) {
            b.push(band).unwrap();
        }
        b.finish().unwrap();
        drop(b);
        let f = sink.finish().unwrap();
        let mut bytes = f.out.clone();
        let (at, patch) = f.patch();
        bytes[at as usize..at as usize + 8].copy_from_slice(&patch);
        std::fs::write(&path, &bytes).unwrap();
        (path, bytes, f.levels, f.places)
    };
    let (path, bytes, index, places) = make("a.tiff");
    assert_eq!(index.len(), 12, "1300×900 down to 1×1");
    let slide = Slide::open_with(&path, Reader::OpenSlide).unwrap();
    assert_eq!(slide.levels().len(), index.len());
    for (i, ix) in index.iter().enumerate() {
        let read = slide
            .read_rgb_openslide(i as u32, 0, 0, u64::from(ix.width), u64::from(ix.height))
            .unwrap();
        assert!(
            read == decoded_level(&path, ix),
            "level {i} differs from its stored tiles"
        );
        let at = places[i].offsets_at as usize;
        let first = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        assert_eq!(first, ix.offsets[0], "level {i}'s offsets are where the index says");
    }
    // Full resolution is the image itself, through JPEG at quality 85.
    let full = decoded_level(&path, &index[0]);
    let mse: f64 = full
        .iter()
        .zip(&px)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
        .sum::<f64>()
        / px.len() as f64;
    let psnr = 10.0 * (255.0f64 * 255.0 / mse).log10();
    assert!(psnr > 30.0, "{psnr:.1} dB");
    for run in ["b.tiff", "c.tiff"] {
        assert!(make(run).1 == bytes, "{run}: the layer's bytes are repeatable");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_same_pixels_give_the_same_bytes_and_no_mpp_gives_no_resolution() {
    let dir = scratch("repeat");
    let (w, h) = (300u32, 260u32);
    let px = picture(w, h);
    let write = |name: &str| {
        let path = dir.join(name);
        layer::write_rgb(std::fs::File::create(&path).unwrap(), &px, w, h, 90, None).unwrap();
        std::fs::read(path).unwrap()
    };
    assert!(write("a.tiff") == write("b.tiff"), "the layer's bytes are repeatable");
    let slide = Slide::open_with(&dir.join("a.tiff"), Reader::OpenSlide).unwrap();
    assert_eq!(slide.property("tiff.XResolution"), None);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_compressors_quality_is_the_jobs_not_the_first_one_its_thread_saw() {
    // The worker keeps one JPEG compressor per thread; each tile is encoded at the quality asked.
    let px = picture(256, 256);
    let enc =
        |q| mira_gpu_worker::process::encode(mira_gpu_worker::process::TileFormat::Jpeg, q, 256, 256, &px).unwrap();
    let low = enc(10);
    let high = enc(95);
    assert!(
        high.len() > 2 * low.len(),
        "quality 95: {} bytes, quality 10: {}",
        high.len(),
        low.len()
    );
    assert_eq!(enc(10), low);
}

/// `mira-worker process --layers` on the CMU slide, as an attempt stores results: one layer
/// per pyramid and no tile files; OpenSlide reads each layer with the slide's size, levels and
/// MPP; every level is its stored tiles; the full-resolution level is within 30 dB of the same
/// job's lossless DeepZoom tree (`--format png`); `stats.json` is on the layer's 256-pixel grid.
#[test]
fn the_pipeline_stores_its_pyramids_as_layers_openslide_reads() {
    let cmu = PathBuf::from(std::env::var("MIRA_TESTDATA").expect("MIRA_TESTDATA names the test slides"))
        .join("CMU-1-Small-Region.svs");
    let dir = scratch("cli");
    let run = |out: &std::path::Path, extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_mira-worker"))
            .arg("process")
            .arg(&cmu)
            .arg("--out")
            .arg(out)
            .args(["--normalize", "reinhard"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (layers, tree) = (dir.join("layers"), dir.join("tree"));
    run(&layers, &["--layers"]);
    run(&tree, &["--format", "png", "--tile-size", "256", "--overlap", "0"]);

    let mut names: Vec<String> = std::fs::read_dir(&layers)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "manifest.json",
            "mask.png",
            "normalized.tiff",
            "slide.tiff",
            "stats.json"
        ],
        "no tile is a file of its own"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layers.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["format_version"], 2);
    assert!(manifest["deepzoom"].get("dzi").is_none(), "{manifest}");
    for name in ["slide", "normalized"] {
        let entry = &manifest["layers"][name];
        let path = layers.join(entry["key"].as_str().unwrap());
        assert_eq!(entry["bytes"], std::fs::metadata(&path).unwrap().len());
        let slide = Slide::open_with(&path, Reader::OpenSlide).unwrap();
        assert_eq!(slide.dimensions(), (2220, 2967));
        assert_eq!(slide.levels().len(), 13);
        assert_eq!(entry["levels"].as_array().unwrap().len(), 13);
        let per_cm: f64 = slide.property("tiff.XResolution").unwrap().parse().unwrap();
        assert!((1e4 / per_cm - 0.499).abs() < 1e-3, "{name}: {per_cm} px/cm");
        // Each level's index, read where the manifest says it lies, is the stored tiles.
        let bytes = std::fs::read(&path).unwrap();
        let long8s = |at: u64, n: usize| -> Vec<u64> {
            (0..n)
                .map(|i| u64::from_le_bytes(bytes[at as usize + i * 8..at as usize + i * 8 + 8].try_into().unwrap()))
                .collect()
        };
        for (i, place) in entry["levels"].as_array().unwrap().iter().enumerate() {
            let (w, h) = (
                place["width"].as_u64().unwrap() as u32,
                place["height"].as_u64().unwrap() as u32,
            );
            let (columns, rows) = layer::grid(w, h);
            let n = (columns * rows) as usize;
            let index = layer::LevelIndex {
                width: w,
                height: h,
                columns,
                rows,
                offsets: long8s(place["offsets_at"].as_u64().unwrap(), n),
                byte_counts: long8s(place["byte_counts_at"].as_u64().unwrap(), n),
            };
            let read = slide
                .read_rgb_openslide(i as u32, 0, 0, u64::from(w), u64::from(h))
                .unwrap();
            assert!(
                read == decoded_level(&path, &index),
                "{name} level {i} differs from its stored tiles"
            );
            if name == "slide" && i == 0 {
                let mut png = vec![0u8; read.len()];
                for row in 0..rows {
                    for col in 0..columns {
                        let f = tree.join(format!("slide_files/12/{col}_{row}.png"));
                        let d = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&f).unwrap()));
                        let mut r = d.read_info().unwrap();
                        let mut buf = vec![0; r.output_buffer_size().unwrap()];
                        let info = r.next_frame(&mut buf).unwrap();
                        let (tw, th) = (info.width as usize, info.height as usize);
                        for y in 0..th {
                            let gy = row as usize * 256 + y;
                            let at = (gy * w as usize + col as usize * 256) * 3;
                            png[at..at + tw * 3].copy_from_slice(&buf[y * tw * 3..(y + 1) * tw * 3]);
                        }
                    }
                }
                let mse: f64 = read
                    .iter()
                    .zip(&png)
                    .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                    .sum::<f64>()
                    / read.len() as f64;
                let psnr = 10.0 * (255.0f64 * 255.0 / mse).log10();
                assert!(psnr >= 30.0, "the layer is {psnr:.1} dB from the lossless tree");
            }
        }
    }
    let stats: serde_json::Value = serde_json::from_slice(&std::fs::read(layers.join("stats.json")).unwrap()).unwrap();
    assert_eq!(
        (stats["tile_size"].as_u64(), stats["overlap"].as_u64()),
        (Some(256), Some(0))
    );
    assert_eq!(
        stats["tiles"].as_array().unwrap().len(),
        9 * 12,
        "the layer's full-resolution tiles"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
