//! Who creates which store, against a real nats-server: the agent creates the data
//! plane's stores ([`Stores::open`]) but never the fences, which are the command
//! service's; every other process binds ([`Stores::bind`]) and creates nothing. A store
//! not there yet is [`StoreError::Missing`], which a service waits out.

use anyhow::{bail, Result};
use async_nats::jetstream;
use futures::TryStreamExt;
use handoff_dataplane::store::{StoreError, Stores};
use handoff_eventlog::fence::Fences;
use handoff_protocol::dataplane::{
    kv_stream, object_stream, CONFIG_BUCKET, FENCES_BUCKET, HEARTBEATS_BUCKET, LEASES_BUCKET,
    OPLOG_STREAM, SNAPSHOT_BUCKET, SNAPSHOT_INDEX_BUCKET,
};
use handoff_testkit::NatsServer;

async fn streams(js: &jetstream::Context) -> Result<Vec<String>> {
    let mut names: Vec<String> = js.stream_names().try_collect().await?;
    names.sort();
    Ok(names)
}

/// The store `open` or `bind` found missing, and who creates it.
fn missing(r: Result<Stores, StoreError>) -> Result<(&'static str, &'static str)> {
    match r {
        Err(StoreError::Missing { store, owner }) => Ok((store, owner)),
        Err(e) => bail!("expected a missing store, got {e}"),
        Ok(_) => bail!("expected a missing store, got the stores"),
    }
}

/// A daemon that starts first creates nothing; the agent then creates its stores and
/// waits for the fences; once the command service has made those, both reach every store.
#[tokio::test]
async fn only_the_owner_of_a_store_creates_it() -> Result<()> {
    let server = NatsServer::start().await?;
    let client = server.connect().await?;
    let js = jetstream::new(client.clone());

    let (store, owner) = missing(Stores::bind(client.clone()).await)?;
    assert_eq!((store, owner), (OPLOG_STREAM, "the agent"));
    assert!(streams(&js).await?.is_empty(), "binding created a store");

    let (store, owner) = missing(Stores::open(client.clone(), 1).await)?;
    assert_eq!((store, owner), (FENCES_BUCKET, "the command service"));
    let mut data_plane = vec![
        OPLOG_STREAM.to_owned(),
        object_stream(SNAPSHOT_BUCKET),
        kv_stream(SNAPSHOT_INDEX_BUCKET),
        kv_stream(CONFIG_BUCKET),
        kv_stream(LEASES_BUCKET),
        kv_stream(HEARTBEATS_BUCKET),
    ];
    data_plane.sort();
    assert_eq!(
        streams(&js).await?,
        data_plane,
        "the agent created the fences"
    );

    Fences::open(&js, 1).await?;
    Stores::open(client.clone(), 1).await?;
    Stores::bind(client).await?;
    Ok(())
}
