//! A blocking client of the local daemon's control socket.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, Result, bail};
use mitosis_sys::fdpass;
use mitosis_transport::control::{Event, Request};
use mitosis_transport::frame;

pub struct Client {
    stream: UnixStream,
}

impl Client {
    pub fn connect(socket: &Path) -> Result<Self> {
        let stream = UnixStream::connect(socket).with_context(|| {
            format!(
                "cannot reach the local mitosisd at {} (is it running?)",
                socket.display()
            )
        })?;
        Ok(Client { stream })
    }

    /// Sends `req`, attaching `fds` (they arrive with the request).
    pub fn send(&mut self, req: &Request, fds: &[i32]) -> Result<()> {
        let bytes = frame::encode(req);
        let sent =
            fdpass::send(self.stream.as_raw_fd(), &bytes, fds).context("sending to mitosisd")?;
        if sent < bytes.len() {
            use std::io::Write;
            self.stream
                .write_all(&bytes[sent..])
                .context("sending to mitosisd")?;
        }
        Ok(())
    }

    pub fn recv(&mut self) -> Result<Event> {
        match frame::read_blocking(&mut self.stream) {
            Ok(ev) => Ok(ev),
            Err(frame::FrameError::Closed) => bail!("mitosisd closed the connection"),
            Err(e) => Err(e).context("reading from mitosisd"),
        }
    }

    /// One request, one answer; an `Error` event becomes an error.
    pub fn call(&mut self, req: &Request) -> Result<Event> {
        self.send(req, &[])?;
        match self.recv()? {
            Event::Error(msg) => bail!("{msg}"),
            ev => Ok(ev),
        }
    }

    pub fn try_clone(&self) -> Result<Client> {
        Ok(Client {
            stream: self.stream.try_clone()?,
        })
    }
}
