//! Two small clocks of handshake load, on time passed in: a count of events per
//! one-second window, and a memory of load that lasts a second after it was last
//! seen (kernel WireGuard stays under load for a second the same way).
//!
//! Used by a tunnel's admission (its own limit) and by the process-wide budget
//! (initiations offered across tunnels). Not here: what counts as load.

use std::time::{Duration, Instant};

/// How long load is remembered after it was last seen, and how long a counting
/// window lasts.
pub const SECOND: Duration = Duration::from_secs(1);

/// A count of events in one-second windows: a window opens with the first event
/// after the last one closed.
#[derive(Debug, Default)]
pub struct PerSecond {
    start: Option<Instant>,
    count: u32,
}

impl PerSecond {
    /// The count in the window `now` falls in (0 if a new one opens).
    pub fn at(&mut self, now: Instant) -> u32 {
        let fresh = self
            .start
            .is_none_or(|start| now.saturating_duration_since(start) >= SECOND);
        if fresh {
            self.start = Some(now);
            self.count = 0;
        }
        self.count
    }

    /// Counts one event at `now`; returns the window's count.
    pub fn add(&mut self, now: Instant) -> u32 {
        self.count = self.at(now).saturating_add(1);
        self.count
    }
}

/// Load remembered for a second after it was last seen.
#[derive(Debug, Default)]
pub struct LoadMemory {
    last: Option<Instant>,
}

impl LoadMemory {
    /// Load seen at `now`. An earlier `now` than the last one marked (tunnels
    /// sharing this memory read their clocks at different times) changes nothing.
    pub fn mark(&mut self, now: Instant) {
        self.last = Some(self.last.map_or(now, |last| last.max(now)));
    }

    /// True if load was seen less than a second before `now`.
    pub fn active(&self, now: Instant) -> bool {
        self.last
            .is_some_and(|t| now.saturating_duration_since(t) < SECOND)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_open_with_the_first_event_after_a_second() {
        let mut w = PerSecond::default();
        let t0 = Instant::now();
        assert_eq!(w.add(t0), 1);
        assert_eq!(w.add(t0 + Duration::from_millis(999)), 2);
        assert_eq!(w.at(t0 + SECOND), 0, "a new window");
        assert_eq!(w.add(t0 + SECOND + Duration::from_millis(500)), 1);
    }

    #[test]
    fn load_lasts_a_second_after_it_was_last_seen() {
        let mut load = LoadMemory::default();
        let t0 = Instant::now();
        assert!(!load.active(t0));
        load.mark(t0);
        assert!(load.active(t0 + Duration::from_millis(999)));
        assert!(!load.active(t0 + SECOND));
    }

    #[test]
    fn an_earlier_mark_does_not_shorten_the_load() {
        let mut load = LoadMemory::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        load.mark(t0 + ms(500));
        load.mark(t0);
        assert!(load.active(t0 + ms(1400)));
        assert!(!load.active(t0 + ms(1500)));
    }
}
