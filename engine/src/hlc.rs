//! Hybrid logical clock.
//!
//! A stamp packs wall-clock milliseconds (48 bits, enough until the year
//! 10889) and a logical counter (16 bits) into one `u64`, so stamps compare as
//! plain integers and cost one varint on the wire. The clock never goes
//! backwards, even when the wall clock does, and it moves past every stamp it
//! observes, so a write made after seeing another write always wins over it.

use serde::{Deserialize, Serialize};

/// A hybrid logical clock reading.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc(pub u64);

const COUNTER_BITS: u32 = 16;
const COUNTER_MAX: u64 = (1 << COUNTER_BITS) - 1;

impl Hlc {
    pub fn new(wall_ms: u64, counter: u16) -> Hlc {
        Hlc((wall_ms << COUNTER_BITS) | u64::from(counter))
    }

    pub fn wall_ms(self) -> u64 {
        self.0 >> COUNTER_BITS
    }

    pub fn counter(self) -> u16 {
        (self.0 & COUNTER_MAX) as u16
    }
}

/// The write order of two stamped writes: clock first, then the writer's
/// client id, so that equal clocks on two devices still have one winner.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Stamp {
    pub hlc: Hlc,
    pub client_id: u64,
}

/// A clock that hands out strictly increasing stamps.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    last: Hlc,
}

impl Clock {
    pub fn starting_at(last: Hlc) -> Clock {
        Clock { last }
    }

    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A new stamp later than every stamp seen or made so far.
    pub fn now(&mut self, wall_ms: u64) -> Hlc {
        let next = if wall_ms > self.last.wall_ms() {
            Hlc::new(wall_ms, 0)
        } else if self.last.counter() < COUNTER_MAX as u16 {
            Hlc(self.last.0 + 1)
        } else {
            // Counter exhausted within one millisecond: borrow the next one.
            Hlc::new(self.last.wall_ms() + 1, 0)
        };
        self.last = next;
        next
    }

    /// Takes note of a stamp made elsewhere.
    pub fn observe(&mut self, remote: Hlc) {
        if remote > self.last {
            self.last = remote;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_increase_even_when_the_wall_clock_goes_back() {
        let mut c = Clock::default();
        let a = c.now(1_000);
        let b = c.now(1_000);
        let d = c.now(500);
        assert!(a < b && b < d);
        assert_eq!(a.wall_ms(), 1_000);
        assert_eq!(d.wall_ms(), 1_000);
        assert_eq!(d.counter(), 2);
    }

    #[test]
    fn observed_stamps_are_overtaken() {
        let mut c = Clock::default();
        let remote = Hlc::new(3_600_000 + 5, 7);
        c.observe(remote);
        assert!(c.now(5) > remote);
    }

    #[test]
    fn counter_overflow_moves_to_the_next_millisecond() {
        let mut c = Clock::starting_at(Hlc::new(10, u16::MAX));
        let next = c.now(10);
        assert_eq!((next.wall_ms(), next.counter()), (11, 0));
    }

    #[test]
    fn stamps_order_by_clock_then_client() {
        let a = Stamp {
            hlc: Hlc(5),
            client_id: 9,
        };
        let b = Stamp {
            hlc: Hlc(6),
            client_id: 1,
        };
        let c = Stamp {
            hlc: Hlc(6),
            client_id: 2,
        };
        assert!(a < b && b < c);
    }
}
