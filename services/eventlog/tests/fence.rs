//! Fences against a real nats-server: a fence that does not parse is an error, never
//! epoch 0, and a record kept beside a fence is written in one step with the fence
//! check, so a writer frozen between reading the fence and writing is refused.

use anyhow::Result;
use async_nats::jetstream;
use handoff_domain::JobId;
use handoff_eventlog::fence::{FenceError, Fences, BUCKET};
use handoff_testkit::NatsServer;

async fn open(server: &NatsServer) -> Result<(Fences, jetstream::kv::Store)> {
    let js = jetstream::new(server.connect().await?);
    let fences = Fences::open(&js, 1).await?;
    let bucket = js.get_key_value(BUCKET).await?;
    Ok((fences, bucket))
}

fn corrupt(r: &Result<impl std::fmt::Debug, FenceError>, job: &JobId) -> bool {
    matches!(r, Err(FenceError::Corrupt { job: j, .. }) if j == job)
}

/// A fence whose value is not an epoch refuses every read, check, raise, commit and
/// write under it, instead of reading as epoch 0 (which fences nothing off); putting the
/// epoch back, as JSON or as the bare decimal, makes it work again.
#[tokio::test]
async fn a_fence_that_does_not_parse_is_an_error_never_epoch_0() -> Result<()> {
    let server = NatsServer::start().await?;
    let (fences, bucket) = open(&server).await?;
    let job = JobId::new("p/rs1")?;
    fences.raise(&job, 3).await?;
    let held = fences.check(&job, 3).await?;
    bucket
        .put(job.as_str(), "{\"epoch\": \"three\"".into())
        .await?;

    assert!(corrupt(&fences.read(&job).await, &job));
    assert!(corrupt(&fences.check(&job, 1).await, &job));
    assert!(corrupt(&fences.raise(&job, 4).await, &job));
    assert!(corrupt(&fences.commit(&job, 3, held).await, &job));
    assert!(corrupt(
        &fences.put_beside(&job, 3, "head", "h".into()).await,
        &job
    ));
    assert_eq!(fences.read_beside(&job, "head").await?, None);
    // The raise did not overwrite it either.
    let stored = bucket.get(job.as_str()).await?.expect("the corrupt value");
    assert_eq!(&stored[..], b"{\"epoch\": \"three\"");

    bucket.put(job.as_str(), "5".into()).await?;
    assert_eq!(fences.read(&job).await?.epoch, 5);
    bucket.put(job.as_str(), "{\"epoch\": 6}".into()).await?;
    assert!(matches!(
        fences.check(&job, 5).await,
        Err(FenceError::Stale {
            epoch: 5,
            current: 6,
            ..
        })
    ));
    Ok(())
}

/// A writer reads the fence, is frozen while the job moves (the fence rises), then
/// writes the record beside the fence: refused, and nothing is stored. Before, the
/// head position was checked against the fence and then written by a compare-and-set on
/// another key, which the rise of the fence did not touch: the late write went in.
#[tokio::test]
async fn a_write_beside_the_fence_after_it_rose_is_refused_in_the_same_step() -> Result<()> {
    let server = NatsServer::start().await?;
    let (fences, _) = open(&server).await?;
    let job = JobId::new("p/rs2")?;
    fences.put_beside(&job, 1, "head", "at 1".into()).await?;
    let held = fences.check(&job, 1).await?;
    fences.raise(&job, 2).await?;
    let late = fences
        .write_beside(&job, 1, held, "head", "late at 1".into())
        .await;
    assert!(
        matches!(
            late,
            Err(FenceError::Stale {
                epoch: 1,
                current: 2,
                ..
            })
        ),
        "{late:?}"
    );
    assert_eq!(
        fences.read_beside(&job, "head").await?.as_deref(),
        Some(&b"at 1"[..])
    );
    // The owner at 2 writes; a touch of the fence at its own epoch (a snapshot's commit)
    // between its read and its write only makes it read again.
    let held = fences.check(&job, 2).await?;
    fences.commit(&job, 2, held).await?;
    assert!(
        !fences
            .write_beside(&job, 2, held, "head", "at 2".into())
            .await?
    );
    fences.put_beside(&job, 2, "head", "at 2".into()).await?;
    assert_eq!(
        fences.read_beside(&job, "head").await?.as_deref(),
        Some(&b"at 2"[..])
    );
    assert!(matches!(
        fences.put_beside(&job, 1, "head", "stale".into()).await,
        Err(FenceError::Stale { .. })
    ));
    Ok(())
}

/// A writer whose epoch is above the fence (the fence's raise was lost) raises it in the
/// same compare-and-set it writes under: from then on an older epoch is refused, so a
/// record is never followed by one of an older epoch.
#[tokio::test]
async fn a_write_above_the_fence_raises_it_and_shuts_older_writers_out() -> Result<()> {
    let server = NatsServer::start().await?;
    let (fences, _) = open(&server).await?;
    let job = JobId::new("p/rs3")?;
    fences.put_beside(&job, 1, "head", "at 1".into()).await?;
    let old = fences.check(&job, 1).await?;
    fences.put_beside(&job, 2, "head", "at 2".into()).await?;
    assert_eq!(fences.read(&job).await?.epoch, 2);
    assert!(fences
        .write_beside(&job, 1, old, "head", "late".into())
        .await
        .is_err());
    assert_eq!(
        fences.read_beside(&job, "head").await?.as_deref(),
        Some(&b"at 2"[..])
    );
    Ok(())
}
