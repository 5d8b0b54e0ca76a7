//! The router's cost per statement: where a statement may go (a replica or
//! the primary), for a shape seen before (a lookup after replacing the
//! literals) and for a new one (a parse with PostgreSQL's grammar).
//! `cargo bench --bench classify`.

use criterion::{Criterion, criterion_group, criterion_main};
use gatehouse::db::classify::access::{Shapes, shape, shape_key};

const PGBENCH: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = ";
const DJANGO: &str = "SELECT \"stories_story\".\"id\", \"stories_story\".\"title\", \
    \"stories_story\".\"body\", \"stories_story\".\"author_id\" FROM \"stories_story\" \
    WHERE \"stories_story\".\"id\" = ";

fn classification(c: &mut Criterion) {
    let shapes = Shapes::default();
    for (name, prefix) in [("pgbench -S", PGBENCH), ("Django get", DJANGO)] {
        let texts: Vec<String> = (0..1000).map(|i| format!("{prefix}{i} LIMIT 21")).collect();
        let mut i = 0;
        c.bench_function(&format!("{name}: cached shape"), |b| {
            b.iter(|| {
                i = (i + 1) % texts.len();
                shapes.access(texts[i].as_bytes(), true, &[])
            })
        });
        c.bench_function(&format!("{name}: shape key only"), |b| {
            b.iter(|| {
                i = (i + 1) % texts.len();
                shape_key(texts[i].as_bytes(), true)
            })
        });
        c.bench_function(&format!("{name}: parsed (uncached)"), |b| {
            b.iter(|| {
                i = (i + 1) % texts.len();
                shape(texts[i].as_bytes(), true)
            })
        });
    }
    c.bench_function("INSERT: refused without a parse", |b| {
        b.iter(|| shapes.access(b"INSERT INTO t (a, b) VALUES (1, 2)", true, &[]))
    });
}

criterion_group!(benches, classification);
criterion_main!(benches);
