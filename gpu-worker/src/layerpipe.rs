//! Layers streamed from an attempt's process to the worker while they are written (issue 40).
//!
//! The attempt's process has no credentials (ADR 0022), so it cannot upload; writing each layer
//! to local disk first would hold a whole slide's pyramid on the node. Instead the process
//! writes its layers into a pipe the worker gave it, and the worker sends them on to the
//! results store as they come ([`mira_blobs::stream::ObjectStream`]: parts as they fill, the first one,
//! with the header, patched and sent last). A slow store slows the pipe, and with it the
//! pipeline: memory stays bounded.
//!
//! The pipe carries frames, each a kind byte and a layer number:
//! * `S` n, a name's length (one byte) and the name: layer n begins;
//! * `D` n, a length (u32, little-endian, at most [`MAX_FRAME`]) and that many bytes;
//! * `E` n, the first directory's offset (u64, little-endian): layer n is complete, and the
//!   offset goes at bytes 8..16 of its header.
//!
//! The worker does not trust the process: a name it did not expect, bytes for a layer that was
//! not begun, an oversized frame, or a pipe that ends mid-layer abort every upload and fail the
//! attempt; a layer is stored only once its `E` frame came.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use mira_blobs::stream::{StreamSettings, Streamed};
use mira_blobs::ObjectStore;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The layers an attempt may send.
pub const LAYERS: &[&str] = &["slide.tiff", "normalized.tiff"];

/// The largest data frame.
pub const MAX_FRAME: usize = 4 << 20;

/// The process's side: one pipe shared by its layers.
#[derive(Clone)]
pub struct Pipe(Arc<Mutex<Box<dyn Write + Send>>>);

impl Pipe {
    pub fn new(out: impl Write + Send + 'static) -> Self {
        Self(Arc::new(Mutex::new(Box::new(out))))
    }

    fn frame(&self, head: &[u8], body: &[u8]) -> std::io::Result<()> {
        let mut out = self.0.lock().unwrap_or_else(|p| p.into_inner());
        out.write_all(head)?;
        out.write_all(body)
    }

    /// Begins layer `n`, stored as `name`; its bytes go through the writer returned.
    pub fn begin(&self, n: u8, name: &str) -> std::io::Result<LayerOut> {
        let len = u8::try_from(name.len()).map_err(|_| std::io::Error::other("a layer's name is too long"))?;
        self.frame(&[b'S', n, len], name.as_bytes())?;
        Ok(LayerOut {
            pipe: self.clone(),
            n,
            buf: Vec::with_capacity(MAX_FRAME),
        })
    }

    /// Flushes the pipe.
    pub fn flush(&self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

/// One layer's bytes into the pipe, in frames of up to [`MAX_FRAME`].
pub struct LayerOut {
    pipe: Pipe,
    n: u8,
    buf: Vec<u8>,
}

impl LayerOut {
    /// The layer is complete: `first_ifd` goes at bytes 8..16 of its header.
    pub fn end(mut self, first_ifd: u64) -> std::io::Result<()> {
        self.flush()?;
        self.pipe.frame(&[b'E', self.n], &first_ifd.to_le_bytes())?;
        self.pipe.flush()
    }
}

impl Write for LayerOut {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let n = (MAX_FRAME - self.buf.len()).min(bytes.len());
        self.buf.extend_from_slice(&bytes[..n]);
        if self.buf.len() == MAX_FRAME {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let mut head = vec![b'D', self.n];
            head.extend((self.buf.len() as u32).to_le_bytes());
            self.pipe.frame(&head, &self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// The worker's side: reads frames from `from` until it ends, streaming each layer named in
/// `expected` to `store` under `prefix` + its name. Returns the layers completed, by name; on
/// any error every upload begun is aborted.
pub async fn receive(
    mut from: impl AsyncRead + Unpin,
    store: &ObjectStore,
    prefix: &str,
    expected: &[&str],
    settings: StreamSettings,
) -> Result<BTreeMap<String, Streamed>, String> {
    let mut open: BTreeMap<u8, (String, mira_blobs::stream::ObjectStream)> = BTreeMap::new();
    let mut done = BTreeMap::new();
    let result = async {
        let mut buf = Vec::new();
        loop {
            let mut head = [0u8; 2];
            match from.read_exact(&mut head).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(format!("cannot read the layers' pipe: {e}")),
            }
            let [kind, n] = head;
            let eof = |e: std::io::Error| format!("the layers' pipe ended inside a frame: {e}");
            match kind {
                b'S' => {
                    let len = from.read_u8().await.map_err(eof)? as usize;
                    let mut name = vec![0u8; len];
                    from.read_exact(&mut name).await.map_err(eof)?;
                    let name = String::from_utf8(name).map_err(|_| "a layer's name is not UTF-8".to_owned())?;
                    if !expected.contains(&name.as_str()) {
                        return Err(format!(
                            "the attempt began a layer {name:?}, which is not one of {expected:?}"
                        ));
                    }
                    if done.contains_key(&name) || open.values().any(|(o, _)| *o == name) || open.contains_key(&n) {
                        return Err(format!("the attempt began the layer {name:?} twice"));
                    }
                    let stream = store
                        .stream(&format!("{prefix}{name}"), settings)
                        .await
                        .map_err(|e| format!("cannot store the layer {name}: {e}"))?;
                    open.insert(n, (name, stream));
                }
                b'D' => {
                    let len = from.read_u32_le().await.map_err(eof)? as usize;
                    if len > MAX_FRAME {
                        return Err(format!("a frame of {len} bytes is larger than {MAX_FRAME}"));
                    }
                    let Some((name, stream)) = open.get_mut(&n) else {
                        return Err(format!("bytes came for layer {n}, which was not begun"));
                    };
                    buf.resize(len, 0);
                    from.read_exact(&mut buf).await.map_err(eof)?;
                    stream
                        .write(&buf)
                        .await
                        .map_err(|e| format!("cannot store the layer {name}: {e}"))?;
                }
                b'E' => {
                    let first_ifd = from.read_u64_le().await.map_err(eof)?;
                    let Some((name, stream)) = open.remove(&n) else {
                        return Err(format!("layer {n} ended without being begun"));
                    };
                    let stored = stream
                        .finish(Some((8, &first_ifd.to_le_bytes())))
                        .await
                        .map_err(|e| format!("cannot store the layer {name}: {e}"))?;
                    done.insert(name, stored);
                }
                other => return Err(format!("the layers' pipe holds an unknown frame {other:#04x}")),
            }
        }
        if let Some((name, _)) = open.values().next() {
            return Err(format!("the layers' pipe ended before the layer {name} was complete"));
        }
        Ok(())
    }
    .await;
    for (_, (_, stream)) in std::mem::take(&mut open) {
        stream.abort().await;
    }
    result.map(|()| done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose bytes the test reads back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn scratch() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("mira-layerpipe-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn body(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    const SMALL: StreamSettings = StreamSettings {
        part_size: 1 << 20,
        parallel: 2,
    };

    #[tokio::test]
    async fn two_layers_interleaved_arrive_whole_with_their_headers_patched() {
        let out = Shared::default();
        let pipe = Pipe::new(out.clone());
        let (a, b) = (body(MAX_FRAME + 3 * 1024 * 1024 + 17, 1), body(900_000, 2));
        let mut la = pipe.begin(0, "slide.tiff").unwrap();
        let mut lb = pipe.begin(1, "normalized.tiff").unwrap();
        // Written in turns, as the pipeline writes its two pyramids.
        for (ca, cb) in a
            .chunks(700_001)
            .zip(b.chunks(100_000).chain(std::iter::repeat(&[][..])))
        {
            la.write_all(ca).unwrap();
            lb.write_all(cb).unwrap();
        }
        lb.end(0x1122).unwrap();
        la.end(0x3344).unwrap();
        let bytes = out.0.lock().unwrap().clone();

        let dir = scratch();
        let store = ObjectStore::Local(dir.clone());
        let got = receive(&bytes[..], &store, "t/j/1/", &["slide.tiff", "normalized.tiff"], SMALL)
            .await
            .unwrap();
        let with = |mut v: Vec<u8>, ifd: u64| {
            v[8..16].copy_from_slice(&ifd.to_le_bytes());
            v
        };
        let (a, b) = (with(a, 0x3344), with(b, 0x1122));
        assert_eq!(std::fs::read(dir.join("t/j/1/slide.tiff")).unwrap(), a);
        assert_eq!(std::fs::read(dir.join("t/j/1/normalized.tiff")).unwrap(), b);
        assert_eq!(got["slide.tiff"].bytes, a.len() as u64);
        assert_eq!(
            got["slide.tiff"].parts.len(),
            8,
            "7 MiB of 1 MiB parts and what is left"
        );
        assert_eq!(got["normalized.tiff"].parts.len(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// What an attempt's process could send that the worker must refuse, and the uploads it
    /// began are aborted: nothing is stored.
    #[tokio::test]
    async fn a_pipe_the_worker_cannot_trust_stores_nothing() {
        let frames = |f: &dyn Fn(&Pipe)| {
            let out = Shared::default();
            f(&Pipe::new(out.clone()));
            let v = out.0.lock().unwrap().clone();
            v
        };
        let begun_then_cut = frames(&|p| {
            let mut l = p.begin(0, "slide.tiff").unwrap();
            l.write_all(&body(3 << 20, 0)).unwrap();
            l.flush().unwrap();
        });
        let unknown = frames(&|p| drop(p.begin(0, "../../other-tenant/x").unwrap()));
        let twice = frames(&|p| {
            for n in [0, 1] {
                let mut l = p.begin(n, "slide.tiff").unwrap();
                l.write_all(&body(100, n)).unwrap();
                l.end(16).unwrap();
            }
        });
        let mut oversized = frames(&|p| drop(p.begin(0, "slide.tiff").unwrap()));
        oversized.extend([b'D', 0]);
        oversized.extend(((MAX_FRAME + 1) as u32).to_le_bytes());
        let mut unbegun = vec![b'D', 5];
        unbegun.extend(4u32.to_le_bytes());
        unbegun.extend(b"abcd");
        let truncated = {
            let mut v = frames(&|p| {
                let mut l = p.begin(0, "slide.tiff").unwrap();
                l.write_all(&body(100, 0)).unwrap();
                l.end(16).unwrap();
            });
            v.truncate(v.len() - 3);
            v
        };
        for (case, bytes, says) in [
            (
                "a layer never ended",
                begun_then_cut,
                "ended before the layer slide.tiff was complete",
            ),
            ("a name not expected", unknown, "which is not one of"),
            ("a layer begun twice", twice, "twice"),
            ("an oversized frame", oversized, "larger than"),
            ("bytes for no layer", unbegun, "was not begun"),
            ("a frame cut short", truncated, "inside a frame"),
        ] {
            let dir = scratch();
            let store = ObjectStore::Local(dir.clone());
            let e = receive(&bytes[..], &store, "t/j/1/", &["slide.tiff"], SMALL)
                .await
                .unwrap_err();
            assert!(e.contains(says), "{case}: {e}");
            let left: Vec<_> = walk(&dir);
            assert!(
                left.is_empty() || case == "a layer begun twice",
                "{case}: left {left:?}"
            );
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
        out
    }
}
