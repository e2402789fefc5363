//! A hub over TCP: the launching process listens ([`Hub`]), every rank connects to it ([`TcpCollective`]).
//! Two uses:
//!
//! - the CPU collective across processes (what torch calls a gloo-like backend, kept deliberately simple):
//!   each operation sends every rank's buffer to the hub, which combines them in rank order and answers each
//!   rank with its share — deterministic, and the same arithmetic as the in-process backend;
//! - rendezvous and liveness for NCCL ranks: rank 0's 128-byte NCCL id reaches the others as a broadcast
//!   through the hub, and the connection stays open so that a rank that dies (its socket closes) or aborts
//!   makes the hub tell every other rank to abort its communicator.
//!
//! The hub fails the group — and answers every rank with the reason — when a rank disconnects before saying
//! it is done, sends an abort, does not join an operation within the timeout after the first rank did, or
//! when its owner aborts it (a worker process exited with an error).

use super::collective::{check_round, combine, Collective, HostData, Op};
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::Tensor;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const TAG_HELLO: u8 = 1;
const TAG_OP: u8 = 2;
const TAG_RESULT: u8 = 3;
const TAG_ABORT: u8 = 4;
const TAG_NOTE: u8 = 5;
const TAG_DONE: u8 = 6;
/// Largest frame accepted (a bucket of 1 Gi f32 values is 4 GiB; refuse anything beyond 16 GiB as garbage).
const MAX_FRAME: u64 = 16 << 30;

/// A message between a rank and the hub.
#[derive(Debug, Clone, PartialEq)]
enum Frame {
    Hello {
        rank: usize,
        world: usize,
        token: String,
    },
    Op {
        seq: u64,
        op: Op,
        data: HostData,
    },
    Result {
        seq: u64,
        data: HostData,
    },
    Abort(String),
    Note(String),
    Done,
}

fn put_data(out: &mut Vec<u8>, d: &HostData) {
    let (tag, n) = match d {
        HostData::F32(v) => (0u8, v.len()),
        HostData::F64(v) => (1, v.len()),
        HostData::Bf16(v) => (2, v.len()),
        HostData::U8(v) => (3, v.len()),
    };
    out.push(tag);
    out.extend_from_slice(&(n as u64).to_le_bytes());
    match d {
        HostData::F32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        HostData::F64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        HostData::Bf16(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_bits().to_le_bytes())),
        HostData::U8(v) => out.extend_from_slice(v),
    }
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        ensure!(self.0.len() >= n, "truncated frame");
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u32()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn data(&mut self) -> Result<HostData> {
        let tag = self.u8()?;
        let n = self.u64()? as usize;
        let width = match tag {
            0 => 4,
            1 => 8,
            2 => 2,
            3 => 1,
            t => bail!("unknown dtype tag {t}"),
        };
        let bytes = self.take(n.checked_mul(width).context("frame too large")?)?;
        Ok(match tag {
            0 => HostData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect(),
            ),
            1 => HostData::F64(
                bytes
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ),
            2 => HostData::Bf16(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            ),
            _ => HostData::U8(bytes.to_vec()),
        })
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_op(out: &mut Vec<u8>, op: Op) {
    let (code, root) = match op {
        Op::AllReduceSum => (0u8, 0usize),
        Op::ReduceScatterSum => (1, 0),
        Op::AllGather => (2, 0),
        Op::Broadcast { root } => (3, root),
    };
    out.push(code);
    out.extend_from_slice(&(root as u32).to_le_bytes());
}

fn get_op(c: &mut Cursor<'_>) -> Result<Op> {
    let code = c.u8()?;
    let root = c.u32()? as usize;
    Ok(match code {
        0 => Op::AllReduceSum,
        1 => Op::ReduceScatterSum,
        2 => Op::AllGather,
        3 => Op::Broadcast { root },
        c => bail!("unknown operation code {c}"),
    })
}

impl Frame {
    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        match self {
            Frame::Hello { rank, world, token } => {
                body.push(TAG_HELLO);
                body.extend_from_slice(&(*rank as u32).to_le_bytes());
                body.extend_from_slice(&(*world as u32).to_le_bytes());
                put_string(&mut body, token);
            }
            Frame::Op { seq, op, data } => {
                body.push(TAG_OP);
                body.extend_from_slice(&seq.to_le_bytes());
                put_op(&mut body, *op);
                put_data(&mut body, data);
            }
            Frame::Result { seq, data } => {
                body.push(TAG_RESULT);
                body.extend_from_slice(&seq.to_le_bytes());
                put_data(&mut body, data);
            }
            Frame::Abort(reason) => {
                body.push(TAG_ABORT);
                put_string(&mut body, reason);
            }
            Frame::Note(text) => {
                body.push(TAG_NOTE);
                put_string(&mut body, text);
            }
            Frame::Done => body.push(TAG_DONE),
        }
        let mut out = Vec::with_capacity(body.len() + 8);
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn decode(body: &[u8]) -> Result<Frame> {
        let mut c = Cursor(body);
        Ok(match c.u8()? {
            TAG_HELLO => Frame::Hello {
                rank: c.u32()? as usize,
                world: c.u32()? as usize,
                token: c.string()?,
            },
            TAG_OP => Frame::Op {
                seq: c.u64()?,
                op: get_op(&mut c)?,
                data: c.data()?,
            },
            TAG_RESULT => Frame::Result {
                seq: c.u64()?,
                data: c.data()?,
            },
            TAG_ABORT => Frame::Abort(c.string()?),
            TAG_NOTE => Frame::Note(c.string()?),
            TAG_DONE => Frame::Done,
            t => bail!("unknown frame tag {t}"),
        })
    }
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
fn read_frame(r: &mut impl Read) -> std::io::Result<Option<Frame>> {
    let mut len = [0u8; 8];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u64::from_le_bytes(len);
    if len == 0 || len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    Frame::decode(&body)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

fn write_frame(w: &mut impl Write, f: &Frame) -> std::io::Result<()> {
    w.write_all(&f.encode())?;
    w.flush()
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// One rank's connection to a [`Hub`].
pub struct TcpCollective {
    rank: usize,
    world: usize,
    reader: Mutex<BufReader<TcpStream>>,
    writer: Mutex<TcpStream>,
    seq: AtomicU64,
    failed: Mutex<Option<String>>,
    /// Set once this rank said it is done or aborted: the hub closing is then expected.
    closing: Arc<AtomicBool>,
    /// The longest a rank waits for an answer: beyond the hub's own timeout, in case the hub itself hangs.
    patience: Duration,
}

impl TcpCollective {
    /// Connects rank `rank` of `world` to the hub at `addr` (retrying until `timeout` passes, since the hub
    /// may still be starting), presenting the group's `token`.
    pub fn connect(
        addr: &str,
        rank: usize,
        world: usize,
        token: &str,
        timeout: Duration,
    ) -> Result<Self> {
        ensure!(rank < world, "rank {rank} of a group of {world}");
        let deadline = Instant::now() + timeout;
        let stream = loop {
            let attempt = addr
                .to_socket_addrs()
                .with_context(|| format!("resolving the hub address {addr}"))?
                .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(5)).ok());
            match attempt {
                Some(s) => break s,
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                None => {
                    bail!("rank {rank}: could not reach the hub at {addr} within {timeout:.0?}")
                }
            }
        };
        stream.set_nodelay(true)?;
        let patience = timeout * 2 + Duration::from_secs(30);
        stream.set_read_timeout(Some(patience))?;
        let mut writer = stream.try_clone()?;
        write_frame(
            &mut writer,
            &Frame::Hello {
                rank,
                world,
                token: token.to_string(),
            },
        )?;
        Ok(TcpCollective {
            rank,
            world,
            reader: Mutex::new(BufReader::new(stream)),
            writer: Mutex::new(writer),
            seq: AtomicU64::new(0),
            failed: Mutex::new(None),
            closing: Arc::new(AtomicBool::new(false)),
            patience,
        })
    }

    fn send(&self, f: &Frame) -> Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut *w, f).context("writing to the hub")
    }

    fn fail(&self, reason: String) -> anyhow::Error {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.get_or_insert(reason.clone());
        anyhow!("collective aborted: {reason}")
    }

    fn exchange(&self, op: Op, data: HostData) -> Result<HostData> {
        if let Some(reason) = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            bail!("collective aborted: {reason}");
        }
        let mut reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = self.send(&Frame::Op { seq, op, data }) {
            // The hub may have said why before it closed the connection.
            if let Ok(Some(Frame::Abort(reason))) = read_frame(&mut *reader) {
                return Err(self.fail(reason));
            }
            return Err(self.fail(format!("rank {}: {op}: the hub is gone: {e:#}", self.rank)));
        }
        let started = Instant::now();
        loop {
            match read_frame(&mut *reader) {
                Ok(Some(Frame::Result { seq: s, data })) if s == seq => return Ok(data),
                Ok(Some(Frame::Abort(reason))) => return Err(self.fail(reason)),
                Ok(Some(other)) => {
                    return Err(self.fail(format!("rank {}: unexpected {other:?}", self.rank)))
                }
                Ok(None) => {
                    return Err(self.fail(
                        "the hub closed the connection (the launching process ended)".into(),
                    ))
                }
                Err(e) if is_timeout(&e) && started.elapsed() < self.patience => continue,
                Err(e) => {
                    let reason = format!("rank {}: {op}: no answer from the hub: {e}", self.rank);
                    let _ = self.send(&Frame::Abort(reason.clone()));
                    return Err(self.fail(reason));
                }
            }
        }
    }

    fn run(&self, op: Op, x: &Tensor) -> Result<Tensor> {
        let device = x.device().clone();
        self.exchange(op, HostData::of(x)?)?.to_tensor(&device)
    }

    /// Sends a line of text to the hub's owner (rank 0's progress).
    pub fn note(&self, text: &str) -> Result<()> {
        self.send(&Frame::Note(text.to_string()))
    }

    /// Tells the hub that this rank finished normally (its connection closing next is not a failure).
    pub fn done(&self) -> Result<()> {
        self.closing.store(true, Ordering::SeqCst);
        self.send(&Frame::Done)
    }

    /// From now on this connection only watches for failure: a thread reads from the hub and calls
    /// `on_abort` with the reason when the hub sends an abort or goes away (unless this rank has said it
    /// is done or aborted itself). Used by NCCL ranks after the rendezvous, so that a dead peer stops them.
    /// No collective may follow on this link.
    pub fn watch(&self, on_abort: Box<dyn FnOnce(String) + Send>) -> Result<()> {
        let stream = self
            .reader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_ref()
            .try_clone()?;
        stream.set_read_timeout(None)?;
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) =
            Some("the hub link is only watched now".into());
        let closing = self.closing.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stream);
            let reason = loop {
                match read_frame(&mut r) {
                    Ok(Some(Frame::Abort(reason))) => break reason,
                    Ok(Some(_)) => continue,
                    Ok(None) => break "the hub closed the connection".to_string(),
                    Err(e) => break format!("lost the hub: {e}"),
                }
            };
            if !closing.load(Ordering::SeqCst) {
                on_abort(reason);
            }
        });
        Ok(())
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        self.run(Op::AllReduceSum, x)
    }
    fn reduce_scatter_sum(&self, x: &Tensor) -> Result<Tensor> {
        self.run(Op::ReduceScatterSum, x)
    }
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        self.run(Op::AllGather, x)
    }
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        self.run(Op::Broadcast { root }, x)
    }
    fn barrier(&self) -> Result<()> {
        self.exchange(Op::AllReduceSum, HostData::F32(vec![0.0]))
            .map(|_| ())
    }
    fn abort(&self, reason: &str) {
        let reason = format!("rank {}: {reason}", self.rank);
        self.closing.store(true, Ordering::SeqCst);
        let _ = self.send(&Frame::Abort(reason.clone()));
        let _ = self.fail(reason);
    }
}

/// A listening hub (bound, not yet serving).
pub struct Hub {
    listener: TcpListener,
}

enum Event {
    Frame(usize, Frame),
    Closed(usize, String),
    External(String),
}

/// A hub serving one group, on its own thread.
pub struct HubHandle {
    control: Sender<Event>,
    notes: Receiver<(usize, String)>,
    join: Option<JoinHandle<Result<()>>>,
}

impl Hub {
    /// Listens on `addr` (`127.0.0.1:0` for ranks on this machine, `0.0.0.0:0` for several machines).
    pub fn bind(addr: &str) -> Result<Hub> {
        let listener =
            TcpListener::bind(addr).with_context(|| format!("listening on {addr} for ranks"))?;
        Ok(Hub { listener })
    }

    /// The address ranks connect to.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves `world` ranks presenting `token`: they must all connect within `timeout`, and each operation
    /// must be joined by every rank within `timeout` of the first.
    pub fn serve(self, world: usize, token: String, timeout: Duration) -> HubHandle {
        let (control, events) = mpsc::channel();
        let (note_tx, notes) = mpsc::channel();
        let to_self = control.clone();
        let join = std::thread::spawn(move || {
            serve(
                self.listener,
                world,
                &token,
                timeout,
                &events,
                to_self,
                note_tx,
            )
        });
        HubHandle {
            control,
            notes,
            join: Some(join),
        }
    }
}

impl HubHandle {
    /// Fails the group from outside (a rank's process ended badly): every rank is told `reason`.
    pub fn abort(&self, reason: &str) {
        let _ = self.control.send(Event::External(reason.to_string()));
    }

    /// Lines ranks sent with [`TcpCollective::note`], with their rank.
    pub fn notes(&self) -> &Receiver<(usize, String)> {
        &self.notes
    }

    /// Whether the hub has stopped (all ranks done, or failed).
    pub fn is_finished(&self) -> bool {
        self.join.as_ref().is_none_or(|j| j.is_finished())
    }

    /// Waits for the hub to stop: `Ok` when every rank said it was done, else why the group failed.
    pub fn finish(mut self) -> Result<()> {
        match self.join.take() {
            Some(j) => j
                .join()
                .unwrap_or_else(|_| Err(anyhow!("the hub panicked"))),
            None => Ok(()),
        }
    }
}

/// The hub's state while it serves a group.
struct Serving {
    world: usize,
    timeout: Duration,
    writers: Vec<Option<TcpStream>>,
    inputs: Vec<Option<(u64, Op, HostData)>>,
    round_started: Option<Instant>,
    done: Vec<bool>,
    notes: Sender<(usize, String)>,
}

impl Serving {
    /// Tells every connected rank why the group failed, and returns that as the hub's error.
    fn fail(&mut self, reason: String) -> anyhow::Error {
        for w in self.writers.iter_mut().flatten() {
            let _ = write_frame(w, &Frame::Abort(reason.clone()));
        }
        anyhow!("{reason}")
    }

    /// Handles one event; `Ok(true)` once every rank is done.
    fn handle(&mut self, event: Event) -> Result<bool> {
        match event {
            Event::External(reason) => Err(self.fail(reason)),
            Event::Closed(rank, how) => {
                self.writers[rank] = None;
                if self.done[rank] {
                    return Ok(false);
                }
                Err(self.fail(format!(
                    "rank {rank} disconnected before finishing ({how}): it died, was killed or lost the network"
                )))
            }
            Event::Frame(_, Frame::Abort(reason)) => Err(self.fail(reason)),
            Event::Frame(rank, Frame::Note(text)) => {
                let _ = self.notes.send((rank, text));
                Ok(false)
            }
            Event::Frame(rank, Frame::Done) => {
                self.done[rank] = true;
                Ok(self.done.iter().all(|d| *d))
            }
            Event::Frame(rank, Frame::Op { seq, op, data }) => {
                if self.inputs[rank].is_some() {
                    return Err(self.fail(format!(
                        "rank {rank} started a second operation within one round"
                    )));
                }
                self.inputs[rank] = Some((seq, op, data));
                self.round_started.get_or_insert_with(Instant::now);
                if self.inputs.iter().all(Option::is_some) {
                    self.answer()?;
                }
                Ok(false)
            }
            Event::Frame(rank, other) => {
                Err(self.fail(format!("rank {rank} sent an unexpected {other:?}")))
            }
        }
    }

    /// Every rank's input is in: combine and answer each rank.
    fn answer(&mut self) -> Result<()> {
        let round: Vec<(u64, Op, HostData)> = self
            .inputs
            .iter_mut()
            .map(|i| i.take().expect("all in"))
            .collect();
        self.round_started = None;
        let checked: Vec<(Op, &HostData)> = round.iter().map(|(_, op, d)| (*op, d)).collect();
        let results = check_round(&checked).and_then(|()| {
            let data: Vec<&HostData> = round.iter().map(|(_, _, d)| d).collect();
            (0..self.world)
                .map(|r| combine(round[0].1, r, &data))
                .collect::<Result<Vec<_>>>()
        });
        let results = match results {
            Ok(r) => r,
            Err(e) => return Err(self.fail(format!("{e:#}"))),
        };
        for (r, data) in results.into_iter().enumerate() {
            let seq = round[r].0;
            if let Some(w) = self.writers[r].as_mut() {
                if let Err(e) = write_frame(w, &Frame::Result { seq, data }) {
                    return Err(self.fail(format!("rank {r}: could not send its result: {e}")));
                }
            }
        }
        Ok(())
    }

    /// The error when the open round has waited `timeout` for some rank.
    fn check_round_time(&mut self) -> Result<()> {
        if self
            .round_started
            .is_none_or(|t| t.elapsed() < self.timeout)
        {
            return Ok(());
        }
        let missing: Vec<String> = (0..self.world)
            .filter(|&r| self.inputs[r].is_none())
            .map(|r| r.to_string())
            .collect();
        let op = self.inputs.iter().flatten().next().map(|(_, op, _)| *op);
        let reason = format!(
            "rank(s) {} did not join the {} within {:.0?}",
            missing.join(", "),
            op.map(|o| o.to_string()).unwrap_or_default(),
            self.timeout
        );
        Err(self.fail(reason))
    }
}

fn spawn_reader(rank: usize, stream: TcpStream, tx: Sender<Event>) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(stream);
        loop {
            let event = match read_frame(&mut r) {
                Ok(Some(f)) => Event::Frame(rank, f),
                Ok(None) => Event::Closed(rank, "connection closed".into()),
                Err(e) => Event::Closed(rank, e.to_string()),
            };
            let last = matches!(event, Event::Closed(..));
            if tx.send(event).is_err() || last {
                return;
            }
        }
    });
}

fn serve(
    listener: TcpListener,
    world: usize,
    token: &str,
    timeout: Duration,
    events: &Receiver<Event>,
    to_self: Sender<Event>,
    notes: Sender<(usize, String)>,
) -> Result<()> {
    let mut hub = Serving {
        world,
        timeout,
        writers: (0..world).map(|_| None).collect(),
        inputs: vec![None; world],
        round_started: None,
        done: vec![false; world],
        notes,
    };
    // Every rank joins within the timeout; events of ranks that already joined are handled meanwhile.
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let mut joined = 0;
    while joined < world {
        while let Ok(event) = events.try_recv() {
            if hub.handle(event)? {
                return Ok(());
            }
        }
        hub.check_round_time()?;
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                match read_frame(&mut &stream) {
                    Ok(Some(Frame::Hello {
                        rank,
                        world: w,
                        token: t,
                    })) if t == token
                        && w == world
                        && rank < world
                        && hub.writers[rank].is_none() =>
                    {
                        stream.set_read_timeout(None)?;
                        stream.set_nodelay(true)?;
                        spawn_reader(rank, stream.try_clone()?, to_self.clone());
                        hub.writers[rank] = Some(stream);
                        joined += 1;
                    }
                    other => tracing::warn!("hub: refused a connection from {peer}: {other:?}"),
                }
            }
            Err(e) if is_timeout(&e) => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (0..world)
                        .filter(|&r| hub.writers[r].is_none())
                        .map(|r| r.to_string())
                        .collect();
                    return Err(hub.fail(format!(
                        "rank(s) {} did not connect within {timeout:.0?}",
                        missing.join(", ")
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("accepting ranks"),
        }
    }
    drop(listener);
    loop {
        let wait = match hub.round_started {
            Some(t) => (t + timeout).saturating_duration_since(Instant::now()),
            None => Duration::from_secs(3600),
        };
        match events.recv_timeout(wait.max(Duration::from_millis(1))) {
            Ok(event) => {
                if hub.handle(event)? {
                    return Ok(());
                }
            }
            Err(RecvTimeoutError::Timeout) => hub.check_round_time()?,
            Err(RecvTimeoutError::Disconnected) => bail!("the hub lost its event channel"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: Vec<f32>) -> Tensor {
        let n = v.len();
        Tensor::from_vec(v, n, &Device::Cpu).unwrap()
    }

    fn start(world: usize, timeout: Duration) -> (HubHandle, String) {
        let hub = Hub::bind("127.0.0.1:0").unwrap();
        let addr = hub.local_addr().unwrap().to_string();
        (hub.serve(world, "secret".into(), timeout), addr)
    }

    #[test]
    fn frames_round_trip() {
        for f in [
            Frame::Hello {
                rank: 3,
                world: 4,
                token: "t".into(),
            },
            Frame::Op {
                seq: 9,
                op: Op::Broadcast { root: 2 },
                data: HostData::Bf16(vec![half::bf16::from_f32(1.5)]),
            },
            Frame::Result {
                seq: 1,
                data: HostData::U8(vec![1, 2, 3]),
            },
            Frame::Abort("why".into()),
            Frame::Note("n".into()),
            Frame::Done,
        ] {
            let bytes = f.encode();
            assert_eq!(read_frame(&mut &bytes[..]).unwrap(), Some(f));
        }
    }

    #[test]
    fn ranks_over_tcp_agree_with_the_in_process_arithmetic() {
        let (hub, addr) = start(3, Duration::from_secs(30));
        let results: Vec<_> = std::thread::scope(|s| {
            let joins: Vec<_> = (0..3)
                .map(|rank| {
                    let addr = addr.clone();
                    s.spawn(move || {
                        let c = TcpCollective::connect(
                            &addr,
                            rank,
                            3,
                            "secret",
                            Duration::from_secs(30),
                        )
                        .unwrap();
                        let r = rank as f32;
                        let sum = c.all_reduce_sum(&t(vec![r, 1.0])).unwrap();
                        let part = c.reduce_scatter_sum(&t(vec![r; 6])).unwrap();
                        let all = c.all_gather(&t(vec![r])).unwrap();
                        let b = c.broadcast(&t(vec![r]), 1).unwrap();
                        c.done().unwrap();
                        [sum, part, all, b].map(|x| x.to_vec1::<f32>().unwrap())
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        });
        hub.finish().unwrap();
        for r in results {
            assert_eq!(r[0], vec![3.0, 3.0]);
            assert_eq!(r[1], vec![3.0, 3.0]);
            assert_eq!(r[2], vec![0.0, 1.0, 2.0]);
            assert_eq!(r[3], vec![1.0]);
        }
    }

    #[test]
    fn a_rank_that_disconnects_or_never_joins_fails_the_others() {
        let (hub, addr) = start(2, Duration::from_secs(30));
        let t0 = Instant::now();
        let err = std::thread::scope(|s| {
            let a = addr.clone();
            s.spawn(move || {
                let c =
                    TcpCollective::connect(&a, 1, 2, "secret", Duration::from_secs(30)).unwrap();
                drop(c); // dies without saying done
            });
            let c = TcpCollective::connect(&addr, 0, 2, "secret", Duration::from_secs(30)).unwrap();
            format!("{:#}", c.all_reduce_sum(&t(vec![1.0])).unwrap_err())
        });
        assert!(err.contains("rank 1 disconnected"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert!(hub.finish().is_err());

        let (hub, addr) = start(2, Duration::from_millis(500));
        let err = std::thread::scope(|s| {
            let a = addr.clone();
            let sleeper = s.spawn(move || {
                let c =
                    TcpCollective::connect(&a, 1, 2, "secret", Duration::from_secs(30)).unwrap();
                std::thread::sleep(Duration::from_secs(2));
                c
            });
            let c = TcpCollective::connect(&addr, 0, 2, "secret", Duration::from_secs(30)).unwrap();
            let t0 = Instant::now();
            let e = format!("{:#}", c.all_reduce_sum(&t(vec![1.0])).unwrap_err());
            assert!(
                t0.elapsed() < Duration::from_millis(1900),
                "{:?}",
                t0.elapsed()
            );
            drop(sleeper.join().unwrap());
            e
        });
        assert!(
            err.contains("rank(s) 1 did not join the all-reduce"),
            "{err}"
        );
        let _ = hub.finish();
    }

    #[test]
    fn an_outside_abort_and_a_wrong_token_are_handled() {
        let (hub, addr) = start(1, Duration::from_secs(2));
        // A stranger with the wrong token is refused; the rank never arrives: the join times out.
        let stranger =
            TcpCollective::connect(&addr, 0, 1, "guess", Duration::from_secs(5)).unwrap();
        let err = format!("{:#}", hub.finish().unwrap_err());
        assert!(err.contains("rank(s) 0 did not connect"), "{err}");
        drop(stranger);

        let (hub, addr) = start(1, Duration::from_secs(30));
        let c = TcpCollective::connect(&addr, 0, 1, "secret", Duration::from_secs(5)).unwrap();
        c.barrier().unwrap();
        hub.abort("rank 1 exited with status 9");
        let err = format!("{:#}", c.barrier().unwrap_err());
        assert!(err.contains("rank 1 exited with status 9"), "{err}");
        assert!(hub.finish().is_err());
    }
}
