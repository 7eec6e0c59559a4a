//! `mira-worker process` against OpenSlide's own `DeepZoomGenerator` (python3-openslide) on
//! the real CMU-1-Small-Region slide: the same geometry, and tiles within a PSNR bound. Also
//! the refusals of files that are not usable slides.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn testdata() -> PathBuf {
    PathBuf::from(
        std::env::var("MIRA_TESTDATA").expect("MIRA_TESTDATA names the test slides (scripts/bootstrap fetches them)"),
    )
}

fn cmu() -> PathBuf {
    let p = testdata().join("CMU-1-Small-Region.svs");
    assert!(p.exists(), "{} is missing: run scripts/bootstrap", p.display());
    p
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mira-worker-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn worker(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mira-worker"))
        .args(args)
        .output()
        .unwrap()
}

fn read_png(path: &Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb, "{}", path.display());
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

#[test]
fn the_cmu_pyramid_matches_openslides_deepzoom_generator() {
    compare_with_reference(&cmu(), "cmu", 12, &[12, 11, 10, 8]);
}

/// A 3-level pyramidal JPEG TIFF made from the CMU slide with vips: OpenSlide's DeepZoom reads
/// its lower levels from the slide's own lower levels, ours reduces the full level.
#[test]
fn a_generated_three_level_pyramid_matches_openslides_deepzoom_generator() {
    let dir = scratch("pyramid");
    let tif = pyramid(&dir);
    let meta = worker(&["inspect", tif.to_str().unwrap()]);
    let meta: serde_json::Value = serde_json::from_slice(&meta.stdout).unwrap();
    assert_eq!(meta["metadata"]["levels"].as_array().unwrap().len(), 3, "{meta}");
    assert_eq!(meta["readers"][0], "tiff-jpeg", "{meta}");
    // The reader is a setting, read with the others.
    let forced = Command::new(env!("CARGO_BIN_EXE_mira-worker"))
        .args(["inspect", tif.to_str().unwrap()])
        .env("Worker__SlideReader", "OpenSlide")
        .output()
        .unwrap();
    let forced: serde_json::Value = serde_json::from_slice(&forced.stdout).unwrap();
    assert_eq!(
        forced["readers"],
        serde_json::json!(["openslide", "openslide", "openslide"]),
        "{forced}"
    );
    compare_with_reference(&tif, "pyramid-out", 10, &[10, 9, 8, 6]);
    let _ = std::fs::remove_dir_all(dir);
}

/// A 1024×1000 3-level pyramidal JPEG TIFF made from the CMU slide with vips, in `dir`.
fn pyramid(dir: &Path) -> PathBuf {
    pyramid_at(dir, 90)
}

/// As [`pyramid`], at JPEG quality `q` (vips subsamples chroma 4:2:0 below 90).
fn pyramid_at(dir: &Path, q: u8) -> PathBuf {
    let run = |args: &[&str]| {
        let o = Command::new("vips")
            .args(args)
            .output()
            .expect("vips (libvips-tools) is installed");
        assert!(
            o.status.success(),
            "vips {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let (rgba, rgb, crop, tif) = (
        dir.join("a.v"),
        dir.join("b.v"),
        dir.join("c.v"),
        dir.join(format!("pyramid-q{q}.tif")),
    );
    let s = |p: &PathBuf| p.to_str().unwrap().to_owned();
    run(&["openslideload", &s(&cmu()), &s(&rgba)]);
    run(&["flatten", &s(&rgba), &s(&rgb), "--background", "255"]);
    run(&["crop", &s(&rgb), &s(&crop), "0", "0", "1024", "1000"]);
    run(&[
        "tiffsave",
        &s(&crop),
        &s(&tif),
        "--tile",
        "--pyramid",
        "--compression",
        "jpeg",
        "--Q",
        &q.to_string(),
        "--tile-width",
        "256",
        "--tile-height",
        "256",
    ]);
    tif
}

/// Rewrites the width and height of the `ifd`-th image of a little-endian classic TIFF: the
/// header then promises a level its tile offsets do not hold.
fn patch_tiff_level(path: &Path, ifd: usize, width: u32, height: u32) {
    patch_tiff_tags(path, ifd, &[(256, width), (257, height)]);
}

/// Rewrites the values of one-valued `tags` of the `ifd`-th image of a little-endian
/// classic TIFF.
fn patch_tiff_tags(path: &Path, ifd: usize, tags: &[(usize, u32)]) {
    let mut data = std::fs::read(path).unwrap();
    assert_eq!(&data[..4], b"II*\0", "vips writes little-endian classic TIFF");
    let u16_at = |d: &[u8], o: usize| u16::from_le_bytes([d[o], d[o + 1]]) as usize;
    let u32_at = |d: &[u8], o: usize| u32::from_le_bytes(d[o..o + 4].try_into().unwrap()) as usize;
    let mut off = u32_at(&data, 4);
    for _ in 0..ifd {
        off = u32_at(&data, off + 2 + 12 * u16_at(&data, off));
    }
    let mut patched = 0;
    for i in 0..u16_at(&data, off) {
        let e = off + 2 + 12 * i;
        let (tag, kind) = (u16_at(&data, e), u16_at(&data, e + 2));
        let Some(&(_, value)) = tags.iter().find(|t| t.0 == tag) else {
            continue;
        };
        if kind == 3 {
            data[e + 8..e + 10].copy_from_slice(&(value as u16).to_le_bytes());
        } else {
            data[e + 8..e + 12].copy_from_slice(&value.to_le_bytes());
        }
        patched += 1;
    }
    assert_eq!(patched, tags.len());
    std::fs::write(path, data).unwrap();
}

fn compare_with_reference(slide: &Path, name: &str, top: usize, levels: &[usize]) {
    let out = scratch(name);
    let o = worker(&[
        "process",
        slide.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--format",
        "png",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();

    // The reference, for the full-resolution level and three reduced ones.
    let reference = out.join("reference");
    let r = Command::new("/usr/bin/python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/deepzoom_reference.py"))
        .arg(slide)
        .args(["254", "1"])
        .arg(&reference)
        .args(levels.iter().map(|l| l.to_string()))
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "the reference failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let geometry: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();

    // Geometry: the .dzi size, the level count and the tiles per level.
    let dzi = std::fs::read_to_string(out.join("slide.dzi")).unwrap();
    let dims = &geometry["level_dimensions"][top];
    assert!(
        dzi.contains(&format!("Height=\"{}\" Width=\"{}\"", dims[1], dims[0])),
        "{dzi}"
    );
    assert!(dzi.contains("TileSize=\"254\"") && dzi.contains("Overlap=\"1\""));
    assert_eq!(summary["levels"], geometry["level_count"]);
    let count = geometry["level_count"].as_u64().unwrap() as usize;
    let mut ours: BTreeMap<usize, usize> = BTreeMap::new();
    for l in 0..count {
        ours.insert(
            l,
            std::fs::read_dir(out.join(format!("slide_files/{l}"))).unwrap().count(),
        );
        let t = &geometry["level_tiles"][l];
        assert_eq!(
            ours[&l] as u64,
            t[0].as_u64().unwrap() * t[1].as_u64().unwrap(),
            "tiles of level {l}"
        );
    }

    // Pixels: identical reads at full resolution; lower levels differ only by the filter
    // (ours: Lanczos-3 2× reductions of the level above, with Pillow's weights; OpenSlide's:
    // Pillow's Lanczos from the nearest slide level in one step).
    for &level in levels {
        let mut worst = f64::INFINITY;
        for e in std::fs::read_dir(reference.join(level.to_string())).unwrap() {
            let e = e.unwrap();
            let (rw, rh, want) = read_png(&e.path());
            let (gw, gh, got) = read_png(&out.join(format!("slide_files/{level}/{}", e.file_name().to_string_lossy())));
            assert_eq!((gw, gh), (rw, rh), "size of tile {level}/{:?}", e.file_name());
            worst = worst.min(psnr(&got, &want));
        }
        let bound = if level == top { 40.0 } else { 30.0 };
        eprintln!("{name} level {level}: worst tile PSNR {worst:.1} dB (bound {bound})");
        assert!(worst >= bound, "level {level}: PSNR {worst:.1} dB < {bound}");
    }

    // The manifest comes last and covers every object.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let objects = manifest["objects"].as_array().unwrap();
    // The tiles, the .dzi, the tissue mask and the tile statistics.
    assert_eq!(objects.len() as u64, summary["tiles"].as_u64().unwrap() + 3);
    let dzi_entry = objects.iter().find(|o| o["key"] == "slide.dzi").unwrap();
    use sha2::Digest;
    assert_eq!(dzi_entry["sha256"], hex::encode(sha2::Sha256::digest(dzi.as_bytes())));
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn jpeg_tiles_are_written_at_the_asked_quality() {
    // The same tile at two qualities: both JPEG, and the higher quality keeps more bytes.
    let tile_at = |q: &str| {
        let out = scratch(&format!("jpeg-q{q}"));
        let o = worker(&[
            "process",
            cmu().to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quality",
            q,
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let tile = std::fs::read(out.join("slide_files/12/1_1.jpeg")).unwrap();
        let _ = std::fs::remove_dir_all(out);
        tile
    };
    let (high, low) = (tile_at("95"), tile_at("20"));
    for t in [&high, &low] {
        assert_eq!(&t[..3], &[0xFF, 0xD8, 0xFF], "a JPEG");
    }
    assert!(
        high.len() > low.len() * 2,
        "Q95 {} bytes, Q20 {} bytes",
        high.len(),
        low.len()
    );
}

#[test]
fn unusable_files_fail_with_a_clear_reason_and_no_manifest() {
    let dir = scratch("bad");
    let truncated = dir.join("truncated.svs");
    let bytes = std::fs::read(cmu()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let text = dir.join("notes.svs");
    std::fs::write(&text, "a text file, not a slide").unwrap();
    // A level whose header says 900×880 while its tiles cover 512×500: its tile table is
    // refused before OpenSlide reads it (ADR 0023).
    let impossible = pyramid(&dir);
    patch_tiff_level(&impossible, 1, 900, 880);
    for (file, expect) in [
        (&truncated, ""),
        (&text, "not a slide OpenSlide can read"),
        (
            &impossible,
            "the slide is refused: TIFF directory 1: 900 × 880 pixels need 16 tiles, but it lists 4 offsets",
        ),
    ] {
        let out = dir.join("out");
        let o = worker(&[
            "process",
            file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--json",
        ]);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(2), "{file:?}: {err}");
        // libtiff may warn on its own lines first; Mira's verdict is one clear last line.
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with("mira-worker: "), "one clear line: {err}");
        assert!(!last.contains("panicked"), "{err}");
        assert!(last.contains(expect), "{err}");
        assert!(!out.join("manifest.json").exists(), "no manifest for a failed run");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_pipeline_writes_the_mask_statistics_and_a_normalised_pyramid_all_in_the_manifest() {
    let out = scratch("full");
    let o = worker(&[
        "process",
        cmu().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--normalize",
        "macenko",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();

    // Two pyramids of the same geometry.
    assert_eq!(
        std::fs::read(out.join("slide.dzi")).unwrap(),
        std::fs::read(out.join("normalized.dzi")).unwrap()
    );
    let per = manifest["deepzoom"]["tiles"].as_u64().unwrap();
    assert_eq!(summary["tiles"].as_u64().unwrap(), 2 * per);
    assert_eq!(manifest["normalized"]["stains"]["method"], "macenko");
    let original = std::fs::read(out.join("slide_files/12/3_3.jpeg")).unwrap();
    let normalised = std::fs::read(out.join("normalized_files/12/3_3.jpeg")).unwrap();
    assert_ne!(original, normalised, "normalisation changes the pixels");

    // The mask: a greyscale PNG of 0 and 255, with the tissue fraction the summary reports.
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(out.join("mask.png")).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Grayscale);
    buf.truncate(info.buffer_size());
    assert!(buf.iter().all(|v| *v == 0 || *v == 255));
    let fraction = buf.iter().filter(|v| **v == 255).count() as f64 / buf.len() as f64;
    let reported = summary["tissue_fraction"].as_f64().unwrap();
    assert!((fraction - reported).abs() < 1e-9, "{fraction} vs {reported}");
    // The CMU region is a strip of tissue on glass: neither empty nor full.
    assert!((0.15..0.75).contains(&fraction), "{fraction}");

    // Statistics for every full-resolution tile; background tiles are bright and flat.
    let stats: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("stats.json")).unwrap()).unwrap();
    let tiles = stats["tiles"].as_array().unwrap();
    let (cols, rows) = (9, 12); // ceil(2220 / 254), ceil(2967 / 254)
    assert_eq!(tiles.len(), cols * rows);
    let mut tissue_tiles = 0;
    for t in tiles {
        let tissue = t[2].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&tissue));
        let mean: Vec<f64> = serde_json::from_value(t[3].clone()).unwrap();
        if tissue == 0.0 {
            assert!(mean.iter().all(|m| *m > 200.0), "glass is bright: {t}");
        }
        if tissue > 0.9 {
            tissue_tiles += 1;
            assert!(mean[1] < 200.0, "stained tissue absorbs green: {t}");
        }
    }
    assert!(tissue_tiles > 5);

    // Every object is in the manifest with its hash, and nothing else is on disk.
    let mut listed = std::collections::BTreeSet::new();
    for o in manifest["objects"].as_array().unwrap() {
        let key = o["key"].as_str().unwrap();
        let bytes = std::fs::read(out.join(key)).unwrap();
        use sha2::Digest;
        assert_eq!(
            o["sha256"].as_str().unwrap(),
            hex::encode(sha2::Sha256::digest(&bytes)),
            "{key}"
        );
        listed.insert(key.to_owned());
    }
    for want in [
        "mask.png",
        "stats.json",
        "slide.dzi",
        "normalized.dzi",
        "normalized_files/0/0_0.jpeg",
    ] {
        assert!(listed.contains(want), "{want}");
    }
    assert_eq!(listed.len() as u64, 2 * per + 4);
    let _ = std::fs::remove_dir_all(out);
}

/// Every pixel a slide gives, read straight from the file and through OpenSlide, for whole
/// levels and for regions that start and end inside tiles and at the level's edges.
fn assert_direct_reads_equal_openslide(path: &Path) {
    use mira_gpu_worker::slide::{Reader, Slide};
    let slide = Slide::open_with(path, Reader::Auto).unwrap();
    let plain = Slide::open_with(path, Reader::OpenSlide).unwrap();
    for (l, &(w, h, _)) in slide.levels().iter().enumerate() {
        let l = l as u32;
        assert_eq!(slide.reader(l), "tiff-jpeg", "{} level {l}: {slide:?}", path.display());
        assert_eq!(plain.reader(l), "openslide");
        let mut regions = vec![(0, 0, w, h)];
        if l == 0 {
            regions.extend([
                (1, 3, 517, 259),
                (w - 301, h - 203, 301, 203),
                (255, 255, 2, 2),
                (w / 2, 0, 1, h),
            ]);
        }
        for (x, y, rw, rh) in regions {
            let ours = slide.read_rgb_parallel(l, x, y, rw, rh).unwrap();
            let theirs = plain.read_rgb_parallel(l, x, y, rw, rh).unwrap();
            assert_eq!(ours.len(), theirs.len());
            let differ = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "{} level {l} region {x},{y} {rw}×{rh}", path.display());
        }
    }
}

#[test]
fn tiled_jpeg_levels_read_straight_from_the_file_equal_openslides_pixels() {
    // Aperio, RGB JPEG tiles with shared tables.
    assert_direct_reads_equal_openslide(&cmu());
    // Generic TIFF from vips: YCbCr 4:4:4 at Q90, 4:2:0 (libjpeg's upsampling) at Q75.
    let dir = scratch("direct");
    assert_direct_reads_equal_openslide(&pyramid_at(&dir, 90));
    assert_direct_reads_equal_openslide(&pyramid_at(&dir, 75));
    let _ = std::fs::remove_dir_all(dir);
}

/// vips writes RGB JPEG tiles at Q90 (component ids R, G, B; photometric RGB). Tagged YCbCr
/// instead, a level is decoded as libtiff decodes it, by the tag (YCbCr → RGB), not as the
/// streams' own ids suggest: the pixels equal OpenSlide's and differ from the untouched
/// file's.
#[test]
fn a_level_is_decoded_by_its_tiff_colour_tag_as_libtiff_does() {
    use mira_gpu_worker::slide::{Reader, Slide};
    let dir = scratch("contradict");
    let tif = pyramid_at(&dir, 90);
    let untouched = Slide::open_with(&tif, Reader::Auto).unwrap();
    let (w, h, _) = untouched.levels()[1];
    let before = untouched.read_rgb_parallel(1, 0, 0, w, h).unwrap();
    drop(untouched);
    patch_tiff_tags(&tif, 1, &[(262, 6)]);
    let slide = Slide::open_with(&tif, Reader::Auto).unwrap();
    assert_eq!(
        (0..3).map(|l| slide.reader(l)).collect::<Vec<_>>(),
        ["tiff-jpeg", "tiff-jpeg", "tiff-jpeg"]
    );
    let after = slide.read_rgb_parallel(1, 0, 0, w, h).unwrap();
    assert_eq!(after, slide.read_rgb_openslide(1, 0, 0, w, h).unwrap());
    let differ = after.iter().zip(&before).filter(|(a, b)| a != b).count();
    assert!(
        differ > after.len() / 2,
        "{differ} of {} differ; {:?} {:?}",
        after.len(),
        &after[..12],
        &before[..12]
    );
    let _ = std::fs::remove_dir_all(dir);
}
