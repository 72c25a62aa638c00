//! Host stdin to the guest UART, with the terminal in raw mode so the guest's own tty does
//! echo, line editing and Ctrl-C. `Ctrl-A x` quits, `Ctrl-A Ctrl-A` sends a literal Ctrl-A.

use std::io::{self, IsTerminal, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use event_manager::{EventOps, Events, MutEventSubscriber};
use log::warn;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::terminal::Terminal;

use crate::devices::lock;
use crate::devices::pl011::Pl011;
use crate::escape::{Escape, Key};

pub struct Stdin {
    uart: Arc<Mutex<Pl011>>,
    escape: Escape,
    quit: Arc<AtomicBool>,
    raw: bool,
}

impl Stdin {
    pub fn new(uart: Arc<Mutex<Pl011>>) -> Result<Self> {
        let stdin = io::stdin();
        let raw = stdin.is_terminal();
        if raw {
            stdin.lock().set_raw_mode()?;
            eprintln!("[gracevm] console attached: Ctrl-A x quits");
        }
        Ok(Stdin {
            uart,
            escape: Escape::default(),
            quit: Arc::new(AtomicBool::new(false)),
            raw,
        })
    }

    pub fn quit_flag(&self) -> Arc<AtomicBool> {
        self.quit.clone()
    }
}

impl Drop for Stdin {
    fn drop(&mut self) {
        if self.raw {
            let _ = io::stdin().lock().set_canon_mode();
        }
    }
}

impl MutEventSubscriber for Stdin {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 256];
        let n = match io::stdin().lock().read(&mut buf) {
            Ok(0) => {
                // EOF (stdin closed or redirected from a file): stop watching it.
                let _ = ops.remove(events);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(e) => {
                warn!("reading stdin: {e}; the guest gets no more input");
                let _ = ops.remove(events);
                return;
            }
        };
        let mut out = Vec::with_capacity(n);
        for &b in &buf[..n] {
            match self.escape.feed(b) {
                Key::Byte(b) => out.push(b),
                Key::Quit => self.quit.store(true, Ordering::Release),
                Key::Pending => {}
            }
        }
        if !out.is_empty() {
            lock(&self.uart).enqueue_input(&out);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&io::stdin(), EventSet::IN)) {
            warn!("cannot watch stdin: {e}; the guest console is output only");
        }
    }
}
