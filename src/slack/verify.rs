//! Request authentication: Slack's signing secret, checked on the raw body
//! before anything is parsed, and each signature accepted once.

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const SIGNATURE_HEADER: &str = "x-slack-signature";
pub const TIMESTAMP_HEADER: &str = "x-slack-request-timestamp";

/// Slack's window: a request stamped further than this from our clock, in
/// either direction, is refused.
pub const WINDOW: Duration = Duration::from_secs(5 * 60);

/// Signatures remembered at most. Only correctly signed requests are
/// remembered, so only Slack (or whoever holds the signing secret) can fill
/// it; when full, requests are refused (fail closed) rather than forgetting
/// signatures that could then be replayed.
pub const MAX_REMEMBERED: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    MissingHeaders,
    BadSignature,
    Stale,
    /// The same signature was accepted before, within the window.
    Replay,
    /// Too many signatures to remember: refused rather than risk a replay.
    ReplayCacheFull,
    /// Correctly signed, but not UTF-8 text.
    BadBody,
}

impl Rejection {
    pub fn label(self) -> &'static str {
        match self {
            Rejection::MissingHeaders => "missing_signature",
            Rejection::BadSignature => "bad_signature",
            Rejection::Stale => "stale_timestamp",
            Rejection::Replay => "replay",
            Rejection::ReplayCacheFull => "replay_cache_full",
            Rejection::BadBody => "bad_body",
        }
    }
}

/// Signatures accepted in the last two windows (a timestamp up to five
/// minutes ahead stays valid for ten), forgotten in arrival order.
#[derive(Default)]
struct Seen {
    order: VecDeque<(Instant, [u8; 32])>,
    set: HashSet<[u8; 32]>,
}

impl Seen {
    /// True if `sig` is new (and now remembered).
    fn first_time(&mut self, sig: [u8; 32], now: Instant) -> Result<(), Rejection> {
        while let Some((at, old)) = self.order.front() {
            if now.duration_since(*at) <= 2 * WINDOW {
                break;
            }
            self.set.remove(old);
            self.order.pop_front();
        }
        if self.set.contains(&sig) {
            return Err(Rejection::Replay);
        }
        if self.set.len() >= MAX_REMEMBERED {
            return Err(Rejection::ReplayCacheFull);
        }
        self.set.insert(sig);
        self.order.push_back((now, sig));
        Ok(())
    }
}

#[derive(Clone)]
pub struct Verifier {
    /// Keyed with the signing secret; cloned per request.
    mac: Hmac<Sha256>,
    seen: Arc<Mutex<Seen>>,
}

impl Verifier {
    pub fn new(signing_secret: &str) -> Self {
        Verifier {
            // HMAC takes keys of any length (longer ones are hashed), so
            // this never falls back; the fallback keeps the type total.
            mac: Hmac::<Sha256>::new_from_slice(signing_secret.as_bytes()).unwrap_or_else(|_| {
                <Hmac<Sha256> as hmac::digest::KeyInit>::new(&Default::default())
            }),
            seen: Arc::default(),
        }
    }

    /// HMAC-SHA256 over `v0:{ts}:{body}` (the raw bytes), compared in
    /// constant time; the timestamp within five minutes of now; the
    /// signature not seen before; then the body must be UTF-8. Returns the
    /// body as text.
    pub fn verify<'a>(&self, headers: &HeaderMap, body: &'a [u8]) -> Result<&'a str, Rejection> {
        self.verify_at(headers, body, SystemTime::now(), Instant::now())
    }

    fn verify_at<'a>(
        &self,
        headers: &HeaderMap,
        body: &'a [u8],
        now: SystemTime,
        mono: Instant,
    ) -> Result<&'a str, Rejection> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let (Some(sig), Some(ts)) = (header(SIGNATURE_HEADER), header(TIMESTAMP_HEADER)) else {
            return Err(Rejection::MissingHeaders);
        };
        let sig: [u8; 32] = sig
            .strip_prefix("v0=")
            .and_then(|hex_sig| hex::decode(hex_sig).ok())
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(Rejection::BadSignature)?;
        let mut mac = self.mac.clone();
        mac.update(b"v0:");
        mac.update(ts.as_bytes());
        mac.update(b":");
        mac.update(body);
        mac.verify_slice(&sig)
            .map_err(|_| Rejection::BadSignature)?;
        // The timestamp is signed, so it is checked once it is known to be
        // Slack's.
        let ts: u64 = ts.trim().parse().map_err(|_| Rejection::Stale)?;
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        if now.abs_diff(ts) > WINDOW.as_secs() {
            return Err(Rejection::Stale);
        }
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first_time(sig, mono)?;
        std::str::from_utf8(body).map_err(|_| Rejection::BadBody)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const SECRET: &str = "s3cret";

    fn signed(ts: u64, body: &[u8]) -> HeaderMap {
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("v0:{ts}:").as_bytes());
        mac.update(body);
        let sig = format!("v0={}", hex::encode(mac.finalize().into_bytes()));
        let mut h = HeaderMap::new();
        h.insert(SIGNATURE_HEADER, HeaderValue::from_str(&sig).unwrap());
        h.insert(TIMESTAMP_HEADER, HeaderValue::from(ts));
        h
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn good_signature_once_then_replay() {
        let v = Verifier::new(SECRET);
        let t0 = Instant::now();
        let h = signed(1_000_000, b"a=1");
        assert_eq!(v.verify_at(&h, b"a=1", at(1_000_010), t0), Ok("a=1"));
        assert_eq!(
            v.verify_at(&h, b"a=1", at(1_000_020), t0 + Duration::from_secs(10)),
            Err(Rejection::Replay)
        );
        // Another request in the same second is not a replay.
        let other = signed(1_000_000, b"a=2");
        assert_eq!(v.verify_at(&other, b"a=2", at(1_000_010), t0), Ok("a=2"));
        // A clone (another request's handler) shares what was seen.
        assert_eq!(
            v.clone().verify_at(&other, b"a=2", at(1_000_010), t0),
            Err(Rejection::Replay)
        );
    }

    #[test]
    fn forgotten_only_after_its_timestamp_can_no_longer_pass() {
        let v = Verifier::new(SECRET);
        let t0 = Instant::now();
        let h = signed(1_000_000, b"x");
        v.verify_at(&h, b"x", at(999_700), t0).unwrap();
        // Still within the window at +599 s of our clock: still a replay.
        assert_eq!(
            v.verify_at(&h, b"x", at(1_000_299), t0 + Duration::from_secs(599)),
            Err(Rejection::Replay)
        );
        // Once forgotten, the timestamp is stale anyway.
        assert_eq!(
            v.verify_at(&h, b"x", at(1_000_301), t0 + Duration::from_secs(601)),
            Err(Rejection::Stale)
        );
        // The next accepted request forgets it.
        let later = signed(1_000_301, b"y");
        v.verify_at(&later, b"y", at(1_000_301), t0 + Duration::from_secs(601))
            .unwrap();
        assert_eq!(v.seen.lock().unwrap().set.len(), 1);
    }

    #[test]
    fn memory_is_bounded_and_full_fails_closed() {
        let mut seen = Seen::default();
        let t0 = Instant::now();
        for i in 0..MAX_REMEMBERED {
            let mut sig = [0u8; 32];
            sig[..8].copy_from_slice(&(i as u64).to_le_bytes());
            seen.first_time(sig, t0).unwrap();
        }
        assert_eq!(
            seen.first_time([0xff; 32], t0),
            Err(Rejection::ReplayCacheFull)
        );
        seen.first_time([0xff; 32], t0 + 2 * WINDOW + Duration::from_secs(1))
            .unwrap();
        assert_eq!(seen.set.len(), 1);
    }

    #[test]
    fn wrong_missing_stale_and_non_utf8() {
        let v = Verifier::new(SECRET);
        let t0 = Instant::now();
        let h = signed(1_000_000, b"a=1");
        assert_eq!(
            v.verify_at(&h, b"a=2", at(1_000_000), t0),
            Err(Rejection::BadSignature)
        );
        assert_eq!(
            v.verify_at(&HeaderMap::new(), b"a=1", at(1_000_000), t0),
            Err(Rejection::MissingHeaders)
        );
        assert_eq!(
            v.verify_at(&h, b"a=1", at(1_000_301), t0),
            Err(Rejection::Stale)
        );
        assert_eq!(
            v.verify_at(&h, b"a=1", at(999_699), t0),
            Err(Rejection::Stale)
        );
        let raw = b"text=\xff\xfe";
        assert_eq!(
            v.verify_at(&signed(1_000_000, raw), raw, at(1_000_000), t0),
            Err(Rejection::BadBody)
        );
        // Unsigned junk is a bad signature, not a bad body.
        assert_eq!(
            v.verify_at(&signed(1_000_000, b"ok"), raw, at(1_000_000), t0),
            Err(Rejection::BadSignature)
        );
    }
}
