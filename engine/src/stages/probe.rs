//! Measuring the network link between two stage processes: the latency of a small
//! message each way, and the rate of one-way transfers of the sizes stages send (a
//! decoding step's hidden state to a prefill's), each timed to the receiver's reply.
//! The result is a transfer curve the simulator prices a link's copies with.

use std::time::Instant;

use ferry_core::profile::{CurvePoint, TransferCurve};

use super::wire::Message;
use super::Peer;
use crate::EngineError;

/// Message sizes measured, bytes.
const SIZES: [u64; 5] = [16 << 10, 128 << 10, 1 << 20, 4 << 20, 16 << 20];
/// Bytes of the small messages the latency is timed with.
const SMALL: usize = 64;

/// One round trip of `bytes` there and `reply` back, ns.
fn round_trip(peer: &Peer, bytes: usize, reply: u32) -> Result<u64, EngineError> {
    let started = Instant::now();
    peer.send(&Message::Echo { reply_bytes: reply, payload: vec![0x5a; bytes] })?;
    match peer.receive()? {
        Some(Message::Echo { payload, .. }) if payload.len() == reply as usize => {}
        other => {
            return Err(EngineError::Network(format!("{} answered a probe with {other:?}", peer.describe())));
        }
    }
    Ok(started.elapsed().as_nanos() as u64)
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}

/// The link to `peer` as a transfer curve: `latency_ns` half the small round trip,
/// and per size the rate at which the rest of a one-way transfer goes. `trials`
/// repetitions per figure (the median is kept; the spread is noted per point).
pub fn measure_link(peer: &Peer, trials: usize) -> Result<TransferCurve, EngineError> {
    let trials = trials.max(3);
    // Warm the connection (slow start, the receiver's buffers).
    for _ in 0..3 {
        round_trip(peer, 1 << 20, SMALL as u32)?;
    }
    let small: Vec<u64> = (0..trials * 4).map(|_| round_trip(peer, SMALL, SMALL as u32)).collect::<Result<_, _>>()?;
    let latency_ns = (median(small) / 2).max(1);
    let mut points = Vec::new();
    for &size in &SIZES {
        let times: Vec<u64> =
            (0..trials).map(|_| round_trip(peer, size as usize, SMALL as u32)).collect::<Result<_, _>>()?;
        // One way is the round trip less the small reply's way back; the curve's time
        // for a copy is its latency plus bytes ÷ rate.
        let rates: Vec<f64> =
            times.iter().map(|&t| size as f64 / (t.saturating_sub(2 * latency_ns).max(1)) as f64).collect();
        let mut sorted = rates.clone();
        sorted.sort_by(f64::total_cmp);
        let gbps = sorted[sorted.len() / 2];
        let spread = (sorted[sorted.len() - 1] - sorted[0]) / gbps.max(1e-12);
        points.push(CurvePoint { chunk_bytes: size, concurrency: 1, gbps, spread: Some(spread) });
    }
    Ok(TransferCurve { latency_ns, points })
}

/// Answers probes until the prober closes the connection (a stage worker's side).
pub(super) fn answer(peer: &Peer, first: Message) -> Result<(), EngineError> {
    let mut next = Some(first);
    while let Some(message) = next {
        match message {
            Message::Echo { reply_bytes, .. } => {
                peer.send(&Message::Echo { reply_bytes: 0, payload: vec![0xa5; reply_bytes as usize] })?
            }
            other => {
                return Err(EngineError::Network(format!("{} sent {other:?} while probing", peer.describe())));
            }
        }
        next = peer.receive()?;
    }
    Ok(())
}
