//! Serving one disk on its vhost-user socket: the accept loop, a fresh backend and
//! vhost-user daemon per connection, the frontend's control messages relayed to it (see
//! [`relay`]), the commit after each disconnect, and the stop. The manager keeps only its
//! bookkeeping of which disks are served; it learns of connections through
//! [`ConnectionEvent`]s.

use super::backend::BlkBackend;
use super::disk::Disk;
use super::relay::{self, HandlerSocket};
use crate::sync::lock;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

/// What happened to a disk's connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// A frontend connected and its vhost-user session started.
    Connected,
    /// The frontend went away; the pool was committed after it (`committed`: whether that
    /// commit succeeded, so whether its writes are durable).
    Disconnected { committed: bool },
}

/// A disk being served: [`Serving::stop`] ends it.
pub struct Serving {
    disk: Arc<Disk>,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<ShutdownHandle>>>,
    thread: Option<JoinHandle<()>>,
}

/// Serves `disk` on `listener` (bound at `socket`) in a thread of its own until stopped;
/// `on_event` hears of each connection and disconnection.
pub fn start(
    disk: Arc<Disk>,
    listener: UnixListener,
    socket: PathBuf,
    on_event: impl Fn(&Disk, ConnectionEvent) + Send + 'static,
) -> std::io::Result<Serving> {
    let mut handler_socket = HandlerSocket::new()?;
    let stop = Arc::new(AtomicBool::new(false));
    let conn = Arc::new(Mutex::new(None));
    let thread = {
        let (disk, stop, conn) = (disk.clone(), stop.clone(), conn.clone());
        std::thread::Builder::new()
            .name(format!("disk-{}", disk.name))
            .spawn(move || {
                serve_loop(
                    &disk,
                    &listener,
                    &mut handler_socket,
                    &stop,
                    &conn,
                    &on_event,
                )
            })?
    };
    Ok(Serving {
        disk,
        socket,
        stop,
        conn,
        thread: Some(thread),
    })
}

impl Serving {
    /// Disconnects the guest and stops accepting; returns once the disk's thread is gone.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // A write held for pool space would keep the connection's workers, and so the
        // join, waiting for as long as the policy's timeout (or forever).
        self.disk.stop_held_writes();
        if let Some(h) = lock(&self.conn).take() {
            h.shutdown();
        }
        // Wake the accept with a connection of our own.
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_loop(
    disk: &Arc<Disk>,
    listener: &UnixListener,
    handler_socket: &mut HandlerSocket,
    stop: &AtomicBool,
    conn: &Mutex<Option<ShutdownHandle>>,
    on_event: &dyn Fn(&Disk, ConnectionEvent),
) {
    while !stop.load(Ordering::SeqCst) {
        let frontend = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::error!("{}: accept failed: {e}", disk.name);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if disk.refuse_connections.load(Ordering::SeqCst) {
            // The frontend sees the connection end and retries (QEMU's reconnect=…).
            tracing::warn!(
                "{}: connection refused: the image this disk reads is being merged into",
                disk.name
            );
            continue;
        }
        let backend = Arc::new(BlkBackend::new(disk.clone()));
        let mut daemon = match VhostUserDaemon::new(
            format!("vhost-thin-{}", disk.name),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        ) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("{}: cannot start the vhost-user daemon: {e:?}", disk.name);
                return;
            }
        };
        // Each worker serves one queue: it watches that queue's wake eventfd too, which
        // tells it to try the writes it parked for space again.
        for (q, h) in daemon.get_epoll_handlers().iter().enumerate() {
            if let Some(fd) = backend.wake_fd(q) {
                match h.register_listener(fd, EventSet::IN, backend.wake_token()) {
                    Ok(()) => backend.wake_watched(q),
                    Err(e) => tracing::warn!(
                        "{}: queue {q}: cannot watch its wake eventfd ({e}): writes waiting \
                         for space hold the queue",
                        disk.name
                    ),
                }
            }
        }
        let started = (|| {
            let ours = frontend.try_clone()?;
            let handler_end = handler_socket.connect()?;
            let threads = relay::start(
                &disk.name,
                frontend,
                handler_end,
                disk.backend_channel.clone(),
                backend.inflight(),
                disk.num_queues,
            )?;
            Ok::<_, std::io::Error>((ours, threads))
        })();
        let (frontend, relay_threads) = match started {
            Ok(v) => v,
            Err(e) => {
                tracing::error!("{}: cannot relay the connection: {e}", disk.name);
                continue;
            }
        };
        if let Err(e) = daemon.start(handler_socket.listener()) {
            tracing::error!("{}: handler accept failed: {e:?}", disk.name);
            let _ = frontend.shutdown(std::net::Shutdown::Both);
            drop(daemon);
            backend.close_leaked_exit_consumers();
            continue;
        }
        *lock(conn) = daemon.shutdown_handle();
        disk.connected.store(true, Ordering::SeqCst);
        on_event(disk, ConnectionEvent::Connected);
        let r = daemon.wait();
        lock(conn).take();
        backend.signal_exit();
        // Whichever side ended first, end the other too, and wait for the relay.
        let _ = frontend.shutdown(std::net::Shutdown::Both);
        for t in relay_threads {
            let _ = t.join();
        }
        // The handler goes with the daemon, joining the connection's worker threads.
        drop(daemon);
        backend.close_leaked_exit_consumers();
        disk.connected.store(false, Ordering::SeqCst);
        match r {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => tracing::info!("{}: frontend disconnected", disk.name),
            Err(e) => tracing::warn!("{}: connection ended: {e:?}", disk.name),
        }
        // After the commit: whoever hears of it may take the disk's writes as durable
        // (copy the files, start the guest elsewhere).
        let pool = disk.target().pool.clone();
        let committed = match pool.flush() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("{}: commit after disconnect failed: {e}", disk.name);
                false
            }
        };
        on_event(disk, ConnectionEvent::Disconnected { committed });
    }
}
