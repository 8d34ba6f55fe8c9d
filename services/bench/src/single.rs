//! (b): MoveJob of one job at a time, each against the raw atomic batch of its own
//! messages.

use std::collections::HashMap;

use super::*;

const MOVES: usize = 1000;
/// About the size of a signed MoveJob request and of its reply.
const ECHO_BYTES: usize = 600;
const ECHO_SUBJECT: &str = "bench.echo";
/// The command service's window (in events): the history before the moves is longer, so
/// the moves run as in a deployment whose history is past its window (100,000 events by
/// default): earlier ids leave memory for the command archive after each move's reply,
/// and a new id must be known not to be there.
const WINDOW: u64 = 1_000;

/// (b) MoveJob, one job at a time: request-to-reply times of MoveJob, each followed by an
/// awaited atomic batch of the very messages it appended (their subjects under a prefix,
/// payloads and message ids, each expecting its subject's last sequence as MoveJob's
/// did, the first the stream's end) into a stream that holds the same history, so the
/// server does the same work (its own cost of the write); then an awaited publish of as
/// many bytes, and a bare request and reply through the same server.
async fn move_job() -> Result<[Vec<Duration>; 5]> {
    let b = Bench::start_with(handoff_command::Config {
        window: WINDOW,
        ..Default::default()
    })
    .await?;
    b.raw_stream().await?;
    let js = jetstream::new(b.client.clone());
    let (src, dst) = (daemon("src"), daemon("dst"));
    let jobs = fleet(&b, "single", &src, &dst, 4).await?;
    let (src2, dst2) = (daemon("src2"), daemon("dst2"));
    let more = fleet(&b, "again", &src2, &dst2, 4).await?;
    let log = handoff_eventlog::EventLog::attach(
        b.client.clone(),
        handoff_eventlog::Config {
            stream: "RAWBATCH".into(),
            subjects: vec!["rawbatch.>".into()],
            ..Default::default()
        },
    )
    .await?;
    let events = js.get_stream(handoff_protocol::subjects::STREAM).await?;
    let history = handoff_eventlog::EventLog::attach(b.client.clone(), Default::default()).await?;
    // The raw stream's copy of the history so far, and where each subject ends there.
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut end = 0;
    let copy = |m: &async_nats::jetstream::message::StreamMessage, last: &HashMap<String, u64>| {
        handoff_eventlog::Outgoing {
            subject: format!("rawbatch.{}", m.subject),
            payload: m.payload.clone(),
            msg_id: m
                .headers
                .get("Nats-Msg-Id")
                .map(|v| v.as_str().to_owned())
                .unwrap_or_else(|| m.sequence.to_string()),
            expected_last_subject_seq: last.get(m.subject.as_str()).copied().unwrap_or(0),
            expected_subject: None,
            expected_last_seq: None,
        }
    };
    // The command service's model, folded here too: how many ids have left its window,
    // so each raw write waits until the archive has stored them.
    let mut model =
        handoff_command::model::Model::new(handoff_command::model::Config { window: WINDOW });
    let mut evicted = 0;
    for seq in 1..=history.last_sequence().await? {
        let m = events.get_raw_message(seq).await?;
        evicted += fold(&mut model, &m)?;
        end = log.append(&[copy(&m, &last)]).await?.last_seq;
        last.insert(m.subject.to_string(), end);
    }
    // The archive's stream, asked afresh each time (a bucket's status is what it was when
    // bound).
    let mut archive = js
        .get_stream(handoff_protocol::dataplane::kv_stream(
            handoff_protocol::subjects::COMMAND_ARCHIVE_BUCKET,
        ))
        .await?;
    let fences = handoff_eventlog::fence::Fences::bind(&js).await?;
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    let mut batch = Vec::new();
    let mut size = 0;
    for job in jobs.iter().take(MOVES) {
        let before = fences.read(job).await?.epoch;
        let t = Instant::now();
        let applied = b.send(&move_job_to(job, &dst)).await?;
        ours.push(t.elapsed());
        size = applied.events.len();
        // Quiet before the raw write: the job's fence, raised after the reply, is stored,
        // and so is every record that left the window.
        let mut messages = Vec::new();
        for e in &applied.events {
            let m = events.get_raw_message(e.seq).await?;
            evicted += fold(&mut model, &m)?;
            messages.push(copy(&m, &last));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while fences.read(job).await?.epoch == before
            || archive.info().await?.state.messages < evicted
        {
            if Instant::now() > deadline {
                bail!("the fence of {job} or the archive's {evicted} records not stored");
            }
            tokio::task::yield_now().await;
        }
        messages[0].expected_last_seq = Some(end);
        let t = Instant::now();
        let a = log.append(&messages).await?;
        batch.push(t.elapsed());
        for (i, e) in applied.events.iter().enumerate() {
            last.insert(e.subject.clone(), a.first_seq + i as u64);
        }
        end = a.last_seq;
    }
    // The moves ran past the window: ids of the history left memory for the archive.
    if evicted == 0 {
        bail!("no command id left the window of {WINDOW} events");
    }
    // As many moves of the second fleet's jobs, back to back: each next request meets the
    // server while the last move's fence is being written, as a client that does not
    // pause would.
    let mut back_to_back = Vec::new();
    for job in more.iter().take(MOVES) {
        let t = Instant::now();
        b.send(&move_job_to(job, &dst2)).await?;
        back_to_back.push(t.elapsed());
    }
    // A payload as large as the events a MoveJob appends together.
    let payload = bytes::Bytes::from(vec![b'x'; 300 * size.max(1)]);
    for i in 0..MOVES {
        let t = Instant::now();
        js.publish(format!("raw.single.{i}"), payload.clone())
            .await?
            .await?;
        base.push(t.elapsed());
    }
    // And what a request through a service costs on its own: a request and its reply
    // through the same server on a subject no stream captures, answered at once by a
    // responder on a connection of its own, as the command service is.
    let responder = async_nats::connect(b.nats.url()).await?;
    let mut requests = responder.subscribe(ECHO_SUBJECT).await?;
    responder.flush().await?;
    let answering = tokio::spawn(async move {
        while let Some(m) = requests.next().await {
            if let Some(reply) = m.reply {
                let _ = responder.publish(reply, m.payload).await;
            }
        }
    });
    let request = bytes::Bytes::from(vec![b'x'; ECHO_BYTES]);
    // Until the server has the responder's interest (it came on another connection).
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = b.client.request(ECHO_SUBJECT, request.clone()).await {
        if Instant::now() > deadline {
            bail!("nothing answers the echo: {e}");
        }
        tokio::task::yield_now().await;
    }
    let mut echo = Vec::new();
    for _ in 0..MOVES {
        let t = Instant::now();
        b.client.request(ECHO_SUBJECT, request.clone()).await?;
        echo.push(t.elapsed());
    }
    answering.abort();
    Ok([ours, base, batch, echo, back_to_back])
}

/// Folds the stored event `m` into `model`: how many records left its window.
fn fold(
    model: &mut handoff_command::model::Model,
    m: &async_nats::jetstream::message::StreamMessage,
) -> Result<u64> {
    let recorded = handoff_eventlog::Recorded {
        seq: m.sequence,
        subject: m.subject.to_string(),
        envelope: handoff_protocol::EventEnvelope::decode(&m.payload)?,
    };
    model
        .apply(&recorded)
        .map_err(|gap| anyhow::anyhow!("{gap}"))?;
    Ok(model.take_evicted().len() as u64)
}

fn move_job_to(job: &JobId, to: &DaemonId) -> Command {
    Command::MoveJob(MoveJob {
        job: job.clone(),
        to: to.clone(),
        reason: None,
        dry_run: false,
    })
}

pub(crate) async fn bench_b() -> Result<()> {
    let [mut ours, mut raw, mut batch, mut echo, mut back] =
        move_job().await.context("benchmark (b)")?;
    let (o50, o99) = (median(&mut ours), p99(&mut ours));
    let e50 = median(&mut echo);
    let (r50, r99) = (median(&mut raw), p99(&mut raw));
    let (b50, b99) = (median(&mut batch), p99(&mut batch));
    let (k50, k99) = (median(&mut back), p99(&mut back));
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!("(b) MoveJob of one job, request to reply, over {MOVES}");
    println!(
        "    p50: handoff {}   raw atomic batch of the same messages, awaited {} (each pair on a quiet server: the raw write waits until the move's fence and the records it sent to the archive are stored)   ratio {:.3}x   target <= 1.25x: {}",
        ms(o50),
        ms(b50),
        ratio(o50, b50),
        verdict(ratio(o50, b50) <= 1.25)
    );
    println!(
        "    p99: handoff {}   raw atomic batch {}   ratio {:.2}x",
        ms(o99),
        ms(b99),
        ratio(o99, b99)
    );
    println!(
        "    back to back: {MOVES} moves of a second fleet, each move's fence written while the next request runs (the raw batch has no such write): p50 {}, {:.2}x the raw batch; p99 {}",
        ms(k50),
        ratio(k50, b50),
        ms(k99)
    );
    println!(
        "    (a single awaited publish of as many bytes: p50 {}, p99 {})",
        ms(r50),
        ms(r99)
    );
    println!(
        "    (a request and its reply through the server, answered at once: p50 {}; the atomic batch plus that round trip {}, handoff {:.2}x of it)\n",
        ms(e50),
        ms(b50 + e50),
        ratio(o50, b50 + e50)
    );
    Ok(())
}
