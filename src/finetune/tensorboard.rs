//! TensorBoard event files of a run's scalars, written as TensorBoard's own writer writes them:
//! TFRecord framing (length, masked CRC-32C of the length, the record, its masked CRC-32C)
//! around `tensorboard.Event` protocol buffers, the first one naming the file version and each
//! later one holding one scalar (`Summary.Value.simple_value`, what `add_scalar` writes).
//! `tensorboard --logdir` reads the directory; [`read_scalars`] reads it back for tests.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// What TensorBoard's writer puts in the first event of every file.
const FILE_VERSION: &str = "brain.Event:2";
/// The writer named in the first event's `source_metadata`.
const WRITER: &str = "qlorad";

/// An open event file under a log directory.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created), named as TensorBoard's writer names it:
    /// `events.out.tfevents.<seconds>.<host>.<pid>.<n>`, `n` keeping two files of one process
    /// apart within a second.
    pub fn create(dir: &Path, wall_time: f64) -> std::io::Result<Self> {
        static SERIAL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        std::fs::create_dir_all(dir)?;
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty() && !h.contains(['/', '\\']))
            .unwrap_or_else(|| "localhost".into());
        let name = format!(
            "events.out.tfevents.{:010}.{host}.{}.{}",
            wall_time as u64,
            std::process::id(),
            SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let path = dir.join(name);
        let mut w = EventWriter {
            out: BufWriter::new(File::create(&path)?),
            path,
        };
        w.record(&file_version_event(wall_time))?;
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One scalar at one step.
    pub fn scalar(
        &mut self,
        tag: &str,
        step: i64,
        value: f32,
        wall_time: f64,
    ) -> std::io::Result<()> {
        self.record(&scalar_event(tag, step, value, wall_time))
    }

    /// Push what was written to the file, so a reader sees it.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.out.write_all(&frame(data))
    }
}

/// The scalars of a training event under Hugging Face Trainer's names (`train/loss`,
/// `eval/loss`, DPO's `train/rewards/chosen`, ...), as (tag, step, value).
pub fn scalars_of(event: &crate::train::TrainEvent) -> Vec<(String, i64, f32)> {
    use crate::train::TrainEvent;
    let mut out = Vec::new();
    let mut put = |split: &str, step: usize, name: &str, value: f32| {
        out.push((format!("{split}/{name}"), step as i64, value))
    };
    match event {
        TrainEvent::Step {
            step,
            loss,
            learning_rate,
            grad_norm,
            epoch,
            preference: p,
            ..
        } => {
            put("train", *step, "loss", *loss);
            put("train", *step, "learning_rate", *learning_rate as f32);
            put("train", *step, "grad_norm", *grad_norm);
            put("train", *step, "epoch", *epoch as f32);
            for (k, v) in p.iter().flat_map(preference_scalars) {
                put("train", *step, &k, v);
            }
        }
        TrainEvent::Eval {
            step,
            eval_loss,
            eval_accuracy,
            preference: p,
            ..
        } => {
            put("eval", *step, "loss", *eval_loss);
            put("eval", *step, "accuracy", *eval_accuracy);
            for (k, v) in p.iter().flat_map(preference_scalars) {
                put("eval", *step, &k, v);
            }
        }
        _ => {}
    }
    out
}

/// DPO's metrics under their TRL names (`rewards/chosen`, ...).
fn preference_scalars(m: &crate::train::dpo::PreferenceMetrics) -> Vec<(String, f32)> {
    match serde_json::to_value(m) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_f64()? as f32)))
            .collect(),
        _ => Vec::new(),
    }
}

/// One TFRecord: `u64` length, masked CRC of those 8 bytes, the data, masked CRC of the data.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// `Event{wall_time, file_version, source_metadata: SourceMetadata{writer}}`.
pub fn file_version_event(wall_time: f64) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(0x09); // field 1, fixed64: wall_time
    e.extend_from_slice(&wall_time.to_le_bytes());
    bytes_field(&mut e, 3, FILE_VERSION.as_bytes());
    let mut source = Vec::new();
    bytes_field(&mut source, 1, WRITER.as_bytes());
    bytes_field(&mut e, 10, &source);
    e
}

/// `Event{wall_time, step, summary: Summary{value: [Value{tag, simple_value}]}}`; proto3 leaves
/// out a zero step, while `simple_value` sits in a oneof and is always written.
pub fn scalar_event(tag: &str, step: i64, value: f32, wall_time: f64) -> Vec<u8> {
    let mut v = Vec::new();
    bytes_field(&mut v, 1, tag.as_bytes());
    v.push(0x15); // field 2, fixed32: simple_value
    v.extend_from_slice(&value.to_le_bytes());
    let mut summary = Vec::new();
    bytes_field(&mut summary, 1, &v);
    let mut e = Vec::new();
    e.push(0x09);
    e.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        e.push(0x10); // field 2, varint: step
        varint(&mut e, step as u64);
    }
    bytes_field(&mut e, 5, &summary);
    e
}

fn bytes_field(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push(field << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// CRC-32C (Castagnoli), masked as TFRecord masks it.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82f6_3b78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

/// One scalar read back from an event file.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    pub tag: String,
    pub step: i64,
    pub value: f32,
    pub wall_time: f64,
}

/// The scalars of one event file, checking every record's framing and checksums.
pub fn read_scalars(path: &Path) -> std::io::Result<Vec<Scalar>> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let head = bytes
            .get(at..at + 12)
            .ok_or_else(|| bad("a cut record header"))?;
        let len = u64::from_le_bytes(head[..8].try_into().expect("8 bytes")) as usize;
        if masked_crc(&head[..8]).to_le_bytes() != head[8..12] {
            return Err(bad("a record length's checksum does not match"));
        }
        let data = bytes
            .get(at + 12..at + 12 + len)
            .ok_or_else(|| bad("a cut record"))?;
        let crc = bytes
            .get(at + 12 + len..at + 16 + len)
            .ok_or_else(|| bad("a cut record checksum"))?;
        if masked_crc(data).to_le_bytes() != crc {
            return Err(bad("a record's checksum does not match"));
        }
        out.extend(parse_event(data).map_err(&bad)?);
        at += 16 + len;
    }
    Ok(out)
}

/// The scalars of one `Event` (none for the file-version event).
fn parse_event(data: &[u8]) -> Result<Vec<Scalar>, &'static str> {
    let (mut wall_time, mut step) = (0.0, 0i64);
    let mut values = Vec::new();
    for (field, value) in Fields(data) {
        match (field?, value) {
            (1, Value::Fixed64(b)) => wall_time = f64::from_le_bytes(b),
            (2, Value::Varint(v)) => step = v as i64,
            (5, Value::Bytes(summary)) => {
                for (field, value) in Fields(summary) {
                    if let (1, Value::Bytes(v)) = (field?, value) {
                        let (mut tag, mut simple) = (String::new(), None);
                        for (field, value) in Fields(v) {
                            match (field?, value) {
                                (1, Value::Bytes(t)) => {
                                    tag = String::from_utf8(t.to_vec())
                                        .map_err(|_| "a tag that is not UTF-8")?
                                }
                                (2, Value::Fixed32(b)) => simple = Some(f32::from_le_bytes(b)),
                                _ => {}
                            }
                        }
                        values.extend(simple.map(|value| (tag, value)));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(values
        .into_iter()
        .map(|(tag, value)| Scalar {
            tag,
            step,
            value,
            wall_time,
        })
        .collect())
}

enum Value<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

/// The fields of one protocol buffer message, as (field number, value); a malformed field
/// ends the iteration with an error.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for (i, &b) in self.0.iter().enumerate().take(10) {
            v |= ((b & 0x7f) as u64) << (7 * i);
            if b < 0x80 {
                self.0 = &self.0[i + 1..];
                return Some(v);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = (Result<u64, &'static str>, Value<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let malformed = || Some((Err("a malformed event"), Value::Varint(0)));
        let Some(key) = self.varint() else {
            self.0 = &[];
            return malformed();
        };
        let value = match key & 7 {
            0 => self.varint().map(Value::Varint),
            1 => self
                .take(8)
                .map(|b| Value::Fixed64(b.try_into().expect("8 bytes"))),
            2 => self
                .varint()
                .and_then(|n| self.take(n as usize))
                .map(Value::Bytes),
            5 => self
                .take(4)
                .map(|b| Value::Fixed32(b.try_into().expect("4 bytes"))),
            _ => None,
        };
        match value {
            Some(v) => Some((Ok(key >> 3), v)),
            None => {
                self.0 = &[];
                malformed()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // RFC 3720's check value for "123456789".
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    /// The bytes TensorBoard's own `EventFileWriter` wrote for the same scalars
    /// (scripts/gen_tensorboard_fixture.py).
    #[test]
    fn events_match_tensorboards_writer_byte_for_byte() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard");
        let want = std::fs::read(dir.join("events.bin")).unwrap();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("scalars.json")).unwrap())
                .unwrap();
        let mut got = frame(&file_version_event(
            meta["file_version_wall_time"].as_f64().unwrap(),
        ));
        let scalars = meta["scalars"].as_array().unwrap();
        for s in scalars {
            got.extend(frame(&scalar_event(
                s["tag"].as_str().unwrap(),
                s["step"].as_i64().unwrap(),
                s["value"].as_f64().unwrap() as f32,
                s["wall_time"].as_f64().unwrap(),
            )));
        }
        assert_eq!(got, want);
        let read = read_scalars(&dir.join("events.bin")).unwrap();
        assert_eq!(read.len(), scalars.len());
        assert_eq!(read[5].tag, "évaluation/précision");
        assert_eq!(read[4].step, 123_456_789);
        assert_eq!(read[4].value, f32::MAX);
    }

    #[test]
    fn scalars_read_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), 1_700_000_000.25).unwrap();
        w.scalar("train/loss", 0, 2.5, 1_700_000_001.0).unwrap();
        w.scalar("train/loss", 300, 0.0, 1_700_000_002.0).unwrap();
        w.flush().unwrap();
        let name = w.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("events.out.tfevents.1700000000."),
            "{name}"
        );
        let read = read_scalars(w.path()).unwrap();
        assert_eq!(
            read,
            vec![
                Scalar {
                    tag: "train/loss".into(),
                    step: 0,
                    value: 2.5,
                    wall_time: 1_700_000_001.0
                },
                Scalar {
                    tag: "train/loss".into(),
                    step: 300,
                    value: 0.0,
                    wall_time: 1_700_000_002.0
                },
            ]
        );
        // A flipped byte is caught by the checksum.
        let mut bytes = std::fs::read(w.path()).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(w.path(), bytes).unwrap();
        assert!(read_scalars(w.path()).is_err());
    }
}
