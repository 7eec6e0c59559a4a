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
        dir.join("pyramid.tif"),
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
        "90",
        "--tile-width",
        "256",
        "--tile-height",
        "256",
    ]);
    let meta = worker(&["inspect", &s(&tif)]);
    let meta: serde_json::Value = serde_json::from_slice(&meta.stdout).unwrap();
    assert_eq!(meta["metadata"]["levels"].as_array().unwrap().len(), 3, "{meta}");
    compare_with_reference(&tif, "pyramid-out", 10, &[10, 9, 8, 6]);
    let _ = std::fs::remove_dir_all(dir);
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
    // (ours: 2×2 box averages of the level above; OpenSlide's: Lanczos from the nearest level).
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
    assert_eq!(objects.len() as u64, summary["tiles"].as_u64().unwrap() + 1);
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
    for (file, expect) in [(&truncated, ""), (&text, "not a slide OpenSlide can read")] {
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
        assert!(
            err.starts_with("mira-worker: ") && err.lines().count() == 1,
            "one clear line: {err}"
        );
        assert!(err.contains(expect), "{err}");
        assert!(!out.join("manifest.json").exists(), "no manifest for a failed run");
    }
    let _ = std::fs::remove_dir_all(dir);
}
