//! Where a training step's time goes, for `qlorad bench train --profile`: named spans that
//! synchronize the device before and after, so each one measures its kernels' time (plus
//! their launches). Off, a span is one relaxed atomic load. Spans do not nest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::Device;

static ON: AtomicBool = AtomicBool::new(false);
/// `(name, calls, seconds)`.
type Totals = Vec<(&'static str, u64, f64)>;

static STATE: Mutex<(Option<Device>, Totals)> = Mutex::new((None, Vec::new()));

/// Start attributing time on `device`, clearing earlier totals.
pub fn start(device: &Device) {
    let mut s = STATE.lock().expect("profile lock");
    *s = (Some(device.clone()), Vec::new());
    ON.store(true, Ordering::Relaxed);
}

/// Stop; returns `(name, calls, seconds)` per span, largest first.
pub fn stop() -> Totals {
    ON.store(false, Ordering::Relaxed);
    let mut s = STATE.lock().expect("profile lock");
    let mut v = std::mem::take(&mut s.1);
    v.sort_by(|a, b| b.2.total_cmp(&a.2));
    v
}

fn sync() {
    let dev = STATE.lock().expect("profile lock").0.clone();
    if let Some(d) = dev {
        let _ = d.synchronize();
    }
}

pub fn span<R>(name: &'static str, f: impl FnOnce() -> R) -> R {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    sync();
    let t = Instant::now();
    let r = f();
    sync();
    let dt = t.elapsed().as_secs_f64();
    let mut s = STATE.lock().expect("profile lock");
    match s.1.iter_mut().find(|e| e.0 == name) {
        Some(e) => {
            e.1 += 1;
            e.2 += dt;
        }
        None => s.1.push((name, 1, dt)),
    }
    r
}
