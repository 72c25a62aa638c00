//! The console escape: `Ctrl-A x` quits the VMM, `Ctrl-A Ctrl-A` types a Ctrl-A, as in qemu.

const CTRL_A: u8 = 0x01;

#[derive(Debug, PartialEq, Eq)]
pub enum Key {
    /// Pass this byte to the guest.
    Byte(u8),
    /// The user asked to quit.
    Quit,
    /// Swallowed (the first half of an escape).
    Pending,
}

#[derive(Default)]
pub struct Escape {
    armed: bool,
}

impl Escape {
    pub fn feed(&mut self, b: u8) -> Key {
        if !self.armed {
            if b == CTRL_A {
                self.armed = true;
                return Key::Pending;
            }
            return Key::Byte(b);
        }
        self.armed = false;
        match b {
            b'x' | b'X' => Key::Quit,
            // Anything else after Ctrl-A is sent as is; a second Ctrl-A is the literal one.
            other => Key::Byte(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(bytes: &[u8]) -> Vec<Key> {
        let mut e = Escape::default();
        bytes.iter().map(|&b| e.feed(b)).collect()
    }

    #[test]
    fn test_escape_plain_bytes_pass_through() {
        assert_eq!(
            feed_all(b"ls\r"),
            vec![Key::Byte(b'l'), Key::Byte(b's'), Key::Byte(b'\r')]
        );
    }

    #[test]
    fn test_escape_ctrl_a_x_quits() {
        assert_eq!(feed_all(&[CTRL_A, b'x']), vec![Key::Pending, Key::Quit]);
    }

    #[test]
    fn test_escape_double_ctrl_a_sends_one() {
        assert_eq!(
            feed_all(&[CTRL_A, CTRL_A, b'x']),
            vec![Key::Pending, Key::Byte(CTRL_A), Key::Byte(b'x')]
        );
    }
}
