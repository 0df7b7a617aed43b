//! The rate limit for audit records no verified identity stands behind.
//!
//! A TLS handshake failure on the tunnel port or plaintext refused at a
//! strict pod costs an attacker one TCP connection. Recorded one by one,
//! such refusals let anyone who can reach a pod fill the disk and push real
//! decisions out of the log through rotation. So each source address gets a
//! token bucket (a burst, then a steady rate) and all sources together share
//! one more; what the buckets refuse is counted, and one `suppressed`
//! summary per source per window carries the count, the first and last time
//! and the last refusal. Records with a verified identity never come here.
//!
//! The table of sources is bounded: the least recently seen source is
//! forgotten first, its pending count moving into one overflow summary, so
//! the limiter cannot be exhausted by rotating source addresses, and idle
//! sources are forgotten once their bucket is full again.

use std::{
    collections::{BTreeMap, HashMap},
    mem,
    net::IpAddr,
    time::{Duration, Instant},
};

use super::{AuditRecord, Event, timestamp};

/// How records without a verified source identity are limited.
#[derive(Clone, Debug, PartialEq)]
pub struct LimiterConfig {
    /// Records one source address may produce at once.
    pub burst: u32,
    /// Records one source address may produce per second after its burst.
    pub per_sec: f64,
    /// Records all sources together may produce per second (and at once).
    pub total_per_sec: f64,
    /// Source addresses tracked at once.
    pub max_sources: usize,
    /// How long refusals from one source are gathered into one summary.
    pub summary_interval: Duration,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        LimiterConfig {
            burst: 20,
            per_sec: 1.0,
            total_per_sec: 100.0,
            max_sources: 4096,
            summary_interval: Duration::from_secs(60),
        }
    }
}

/// A token bucket holding up to `capacity` tokens, refilled at `rate` per
/// second.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(capacity: f64, now: Instant) -> Self {
        Bucket {
            tokens: capacity,
            at: now,
        }
    }

    fn refilled(&self, capacity: f64, rate: f64, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * rate).min(capacity)
    }

    fn take(&mut self, capacity: f64, rate: f64, now: Instant) -> bool {
        self.tokens = self.refilled(capacity, rate, now);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Refusals counted since a summary window opened.
#[derive(Debug)]
struct Pending {
    count: u64,
    opened: Instant,
    first_time: String,
    last_time: String,
    /// The latest refusal, the template of the summary.
    last: AuditRecord,
}

impl Pending {
    fn new(rec: AuditRecord, now: Instant) -> Self {
        Pending {
            count: 1,
            opened: now,
            first_time: rec.time.clone(),
            last_time: rec.time.clone(),
            last: rec,
        }
    }

    fn add(&mut self, rec: AuditRecord) {
        self.count += 1;
        self.last_time.clone_from(&rec.time);
        self.last = rec;
    }

    /// Folds `other` in (times are fixed-width RFC 3339, so they compare as
    /// text).
    fn merge(&mut self, other: Pending) {
        self.count += other.count;
        self.opened = self.opened.min(other.opened);
        if other.first_time < self.first_time {
            self.first_time = other.first_time;
        }
        if other.last_time > self.last_time {
            self.last_time = other.last_time;
            self.last = other.last;
        }
    }

    /// The `suppressed` record; `sources` is set for the overflow summary.
    fn into_summary(self, sources: Option<u64>) -> AuditRecord {
        let Pending {
            count,
            first_time,
            last_time,
            last,
            ..
        } = self;
        let whom = match sources {
            None => "this source".to_owned(),
            Some(n) => format!("{n} sources forgotten while the limiter's table was full"),
        };
        AuditRecord {
            time: timestamp::now_rfc3339(),
            event: Event::Suppressed,
            policy: None,
            rule: None,
            reason: format!(
                "{count} refusals without a verified identity from {whom} were counted, not \
                 recorded one by one (rate limit); the last: {}",
                last.reason
            ),
            dropped_before: None,
            suppressed: Some(count),
            first_time: Some(first_time),
            last_time: Some(last_time),
            ..last
        }
    }
}

#[derive(Debug)]
struct Tracked {
    bucket: Bucket,
    pending: Option<Pending>,
    /// Key in [`Limiter::by_age`].
    stamp: u64,
}

/// Per-source and overall token buckets with summaries of what they refuse.
/// Time comes from the caller, so tests control it.
#[derive(Debug)]
pub struct Limiter {
    config: LimiterConfig,
    sources: HashMap<IpAddr, Tracked>,
    /// Sources by last use, oldest first, to forget the least recently seen.
    by_age: BTreeMap<u64, IpAddr>,
    next_stamp: u64,
    total: Bucket,
    /// Refusals of sources forgotten before their summary was due.
    overflow: Option<Pending>,
    overflow_sources: u64,
    suppressed: u64,
}

impl Limiter {
    pub fn new(config: LimiterConfig, now: Instant) -> Self {
        let total = Bucket::full(config.total_per_sec.max(1.0), now);
        Limiter {
            config,
            sources: HashMap::new(),
            by_age: BTreeMap::new(),
            next_stamp: 0,
            total,
            overflow: None,
            overflow_sources: 0,
            suppressed: 0,
        }
    }

    /// Refusals suppressed so far (all of them are, or will be, in
    /// summaries).
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// Source addresses currently tracked.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.sources.len()
    }

    /// Returns `rec` if it should be written now, or counts it for its
    /// source's summary. A record without a source address passes.
    pub fn admit(&mut self, rec: AuditRecord, now: Instant) -> Option<AuditRecord> {
        let Some(ip) = rec.source.as_ref().map(|s| s.address.ip()) else {
            return Some(rec);
        };
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        if !self.sources.contains_key(&ip) {
            self.make_room();
        }
        let burst = f64::from(self.config.burst);
        let tracked = self.sources.entry(ip).or_insert_with(|| Tracked {
            bucket: Bucket::full(burst, now),
            pending: None,
            stamp,
        });
        self.by_age.remove(&tracked.stamp);
        tracked.stamp = stamp;
        self.by_age.insert(stamp, ip);
        // The source's own bucket first: a source over its limit does not
        // spend the budget the others share.
        let total_capacity = self.config.total_per_sec.max(1.0);
        let allowed = tracked.bucket.take(burst, self.config.per_sec, now)
            && self
                .total
                .take(total_capacity, self.config.total_per_sec, now);
        if allowed {
            return Some(rec);
        }
        self.suppressed += 1;
        match &mut tracked.pending {
            Some(pending) => pending.add(rec),
            None => tracked.pending = Some(Pending::new(rec, now)),
        }
        None
    }

    /// Forgets the least recently seen sources until one more fits.
    fn make_room(&mut self) {
        while self.sources.len() >= self.config.max_sources.max(1) {
            let Some((_, ip)) = self.by_age.pop_first() else {
                return;
            };
            if let Some(pending) = self.sources.remove(&ip).and_then(|t| t.pending) {
                self.overflow_sources += 1;
                match &mut self.overflow {
                    Some(overflow) => overflow.merge(pending),
                    None => self.overflow = Some(pending),
                }
            }
        }
    }

    /// Summaries whose window has closed, oldest first; forgets sources
    /// that are idle again (nothing pending, bucket full).
    pub fn due(&mut self, now: Instant) -> Vec<AuditRecord> {
        let interval = self.config.summary_interval;
        let is_due = |p: &Pending| now.saturating_duration_since(p.opened) >= interval;
        let mut due: Vec<Pending> = Vec::new();
        for tracked in self.sources.values_mut() {
            if tracked.pending.as_ref().is_some_and(is_due) {
                due.extend(tracked.pending.take());
            }
        }
        let burst = f64::from(self.config.burst);
        let per_sec = self.config.per_sec;
        let by_age = &mut self.by_age;
        self.sources.retain(|_, t| {
            let idle = t.pending.is_none() && t.bucket.refilled(burst, per_sec, now) >= burst;
            if idle {
                by_age.remove(&t.stamp);
            }
            !idle
        });
        due.sort_by(|a, b| a.first_time.cmp(&b.first_time));
        let mut summaries: Vec<AuditRecord> =
            due.into_iter().map(|p| p.into_summary(None)).collect();
        if self.overflow.as_ref().is_some_and(is_due) {
            summaries.extend(self.take_overflow());
        }
        summaries
    }

    /// Every pending summary now, due or not (the log is closing).
    pub fn drain(&mut self) -> Vec<AuditRecord> {
        let mut pending: Vec<Pending> = self
            .sources
            .values_mut()
            .filter_map(|t| t.pending.take())
            .collect();
        pending.sort_by(|a, b| a.first_time.cmp(&b.first_time));
        let mut summaries: Vec<AuditRecord> =
            pending.into_iter().map(|p| p.into_summary(None)).collect();
        summaries.extend(self.take_overflow());
        summaries
    }

    fn take_overflow(&mut self) -> Option<AuditRecord> {
        let sources = mem::take(&mut self.overflow_sources);
        self.overflow.take().map(|p| p.into_summary(Some(sources)))
    }
}
