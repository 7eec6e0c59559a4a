//! Tiles encoded as JPEG or PNG, on the calling thread: the pipeline's DeepZoom trees and its
//! layers both encode here.

use mira_events::params::TileFormat;

thread_local! {
    static JPEG: std::cell::RefCell<Option<turbojpeg::Compressor>> = const { std::cell::RefCell::new(None) };
}

pub fn encode(format: TileFormat, quality: u8, w: u32, h: u32, rgb: &[u8]) -> anyhow::Result<Vec<u8>> {
    match format {
        TileFormat::Png => {
            let mut out = Vec::new();
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_compression(png::Compression::Fast);
            enc.write_header()?.write_image_data(rgb)?;
            Ok(out)
        }
        TileFormat::Jpeg => JPEG.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                let mut c = turbojpeg::Compressor::new()?;
                c.set_subsamp(turbojpeg::Subsamp::Sub2x2);
                *slot = Some(c);
            }
            let c = slot.as_mut().expect("set above");
            // Every call: the compressor is the thread's, and its next job may ask another quality.
            c.set_quality(quality as i32);
            let image = turbojpeg::Image {
                pixels: rgb,
                width: w as usize,
                pitch: w as usize * 3,
                height: h as usize,
                format: turbojpeg::PixelFormat::RGB,
            };
            Ok(c.compress_to_vec(image)?)
        }),
    }
}
