//! The SQL queue of the embedded and postgres profiles, at the seam the engine uses: a step's
//! successor is queued and the step acknowledged in one transaction, and a fresh claim is
//! known to be held without asking the database.

use std::time::Duration;

use serde_json::json;
use workers::broker::sql::SqlBroker;
use workers::broker::{Broker, TaskMessage};
use workers::identity::Identity;
use workers::sql::Database;

use crate::common::postgres::TestPostgres;

fn message(id: &str) -> TaskMessage {
    let mut kwargs = serde_json::Map::new();
    kwargs.insert("workflow_id".into(), json!("wf"));
    kwargs.insert("step".into(), json!("s"));
    TaskMessage {
        id: id.to_owned(),
        task: "noop".into(),
        args: vec![json!(1)],
        kwargs,
        priority: 0,
        eta: None,
        retries: 0,
        root_id: "m1".into(),
        parent_id: None,
        queue: "q".into(),
        time_limits: Default::default(),
    }
}

async fn hand_over_story(db: Database) {
    let lease = Duration::from_millis(600);
    let broker = SqlBroker::new(db.clone(), Identity::current(), lease);
    broker.publish(&message("m1")).await.unwrap();

    let first = broker.next().await.unwrap();
    assert_eq!(first.message().id, "m1");
    assert!(first.surely_held(), "a claim just taken is held");
    first
        .ack_publishing(&broker, Some(&message("m2")))
        .await
        .unwrap();
    assert_eq!(broker.holds("m1").await.unwrap(), Some(false));
    assert_eq!(broker.holds("m2").await.unwrap(), Some(true));

    let second = broker.next().await.unwrap();
    assert_eq!(second.message().id, "m2");
    tokio::time::sleep(lease * 2 / 3).await;
    assert!(
        !second.surely_held(),
        "past half a lease, only the database knows"
    );
    second.keep_alive().await.unwrap();
    assert!(second.surely_held(), "renewed just now");

    // Another consumer took the message over: the hand-over reports the lost claim and leaves
    // that consumer's message alone. The successor is queued all the same (its task id is
    // fixed, so the other consumer's hand-over cannot queue it twice).
    db.write(|tx| {
        tx.execute(
            "UPDATE queue SET lease_owner = 'someone else', lease_until = lease_until + 3600000
             WHERE task_id = 'm2'",
            &[],
        )
    })
    .await
    .unwrap();
    let err = second
        .ack_publishing(&broker, Some(&message("m3")))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("lost"), "{err:#}");
    assert_eq!(broker.holds("m2").await.unwrap(), Some(true));
    assert_eq!(broker.holds("m3").await.unwrap(), Some(true));

    // A successor already queued is not queued twice, and the last step has none.
    let third = broker.next().await.unwrap();
    assert_eq!(third.message().id, "m3");
    broker.publish(&message("m4")).await.unwrap();
    third
        .ack_publishing(&broker, Some(&message("m4")))
        .await
        .unwrap();
    let fourth = broker.next().await.unwrap();
    assert_eq!(fourth.message().id, "m4");
    fourth.ack_publishing(&broker, None).await.unwrap();
    let left: i64 = db
        .read(|conn| conn.query_one("SELECT COUNT(*) FROM queue", &[])?.get(0))
        .await
        .unwrap();
    assert_eq!(
        left, 1,
        "only the message taken over by someone else is left"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_is_handed_over_in_one_transaction_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = workers::sqlite::Db::open(&dir.path().join("q.db"), Duration::from_secs(5)).unwrap();
    hand_over_story(Database::Sqlite(db)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_is_handed_over_in_one_transaction_on_postgres() {
    let Some(database) = TestPostgres::new() else {
        return;
    };
    hand_over_story(Database::Postgres(database.db().await)).await;
}

/// The ids of the messages `broker` claimed and has not handed out.
async fn waiting(broker: &SqlBroker) -> Vec<String> {
    broker.waiting().await.into_iter().map(|m| m.id).collect()
}

/// The lease owner of `task_id`'s row, if it is leased.
async fn owner_of(db: &Database, task_id: &'static str) -> Option<String> {
    db.read(move |conn| {
        conn.query_one(
            "SELECT lease_owner FROM queue WHERE task_id = ?1",
            workers::args![task_id],
        )?
        .get(0)
    })
    .await
    .unwrap()
}

/// On PostgreSQL the acknowledgement of a step claims, in the same statement, the message the
/// slot will ask for next: handed out by the next `next`, reported as waiting meanwhile, never
/// the message acknowledged, passed over by other consumers, given back when the consumer
/// stops, and claimed afresh when it was held too long to be sure of.
#[tokio::test(flavor = "multi_thread")]
async fn an_acknowledgement_claims_the_slots_next_message_on_postgres() {
    let Some(database) = TestPostgres::new() else {
        return;
    };
    let db = Database::Postgres(database.db().await);
    let lease = Duration::from_secs(2);
    let broker = SqlBroker::new(db.clone(), Identity::current(), lease);
    let other = SqlBroker::new(db.clone(), Identity::current(), lease);
    for id in ["a", "b", "c"] {
        broker.publish(&message(id)).await.unwrap();
    }

    let first = broker.next().await.unwrap();
    assert_eq!(first.message().id, "a");
    first
        .ack_publishing(&broker, Some(&message("a2")))
        .await
        .unwrap();
    assert_eq!(
        waiting(&broker).await,
        ["b"],
        "b was claimed with a's acknowledgement"
    );
    assert!(owner_of(&db, "b").await.is_some());
    let elsewhere = other.next().await.unwrap();
    assert_eq!(
        elsewhere.message().id,
        "c",
        "another consumer passes b over"
    );

    let second = broker.next().await.unwrap();
    assert_eq!(second.message().id, "b");
    assert!(second.surely_held());
    assert!(waiting(&broker).await.is_empty());

    // Past its lease, the acknowledged message is still never the one claimed with it.
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    elsewhere.keep_alive().await.unwrap();
    second.ack().await.unwrap();
    assert_eq!(waiting(&broker).await, ["a2"]);

    // Held longer than half a lease: given back and claimed again, under a new owner.
    let held_by = owner_of(&db, "a2").await.unwrap();
    tokio::time::sleep(lease / 2 + Duration::from_millis(100)).await;
    let third = broker.next().await.unwrap();
    assert_eq!(third.message().id, "a2");
    assert!(third.surely_held());
    assert_ne!(
        owner_of(&db, "a2").await.unwrap(),
        held_by,
        "claimed afresh"
    );
    broker.publish(&message("d")).await.unwrap();
    elsewhere.keep_alive().await.unwrap();
    third.ack_publishing(&broker, None).await.unwrap();
    assert_eq!(waiting(&broker).await, ["d"]);

    // A consumer that stops gives back what it claimed ahead, to be taken at once elsewhere;
    // its acknowledgements claim nothing more.
    broker.stop_consuming().await.unwrap();
    assert!(waiting(&broker).await.is_empty());
    assert_eq!(owner_of(&db, "d").await, None);
    elsewhere.ack_publishing(&other, None).await.unwrap();
    let taken = tokio::time::timeout(Duration::from_secs(2), other.next())
        .await
        .expect("a message given back is claimable at once")
        .unwrap();
    assert_eq!(taken.message().id, "d");
    broker.publish(&message("e")).await.unwrap();
    let stopped = SqlBroker::new(db.clone(), Identity::current(), lease);
    stopped.publish(&message("f")).await.unwrap();
    let f = {
        // `other` claims e with d's acknowledgement; f is left for `stopped`.
        taken.ack_publishing(&other, None).await.unwrap();
        stopped.next().await.unwrap()
    };
    assert_eq!(f.message().id, "f");
    stopped.stop_consuming().await.unwrap();
    broker.publish(&message("g")).await.unwrap();
    f.ack().await.unwrap();
    assert!(waiting(&stopped).await.is_empty());
    assert_eq!(
        owner_of(&db, "g").await,
        None,
        "a stopped consumer claims nothing"
    );
    for expected in ["e", "g"] {
        let delivery = other.next().await.unwrap();
        assert_eq!(delivery.message().id, expected);
        delivery.ack().await.unwrap();
    }
    let left: i64 = db
        .read(|conn| conn.query_one("SELECT COUNT(*) FROM queue", &[])?.get(0))
        .await
        .unwrap();
    assert_eq!(left, 0);
}
