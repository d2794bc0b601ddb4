//! The redaction table: every credential form the tracer hides, and look-alikes it must leave
//! alone.

use super::*;

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn redacted(v: &[&str]) -> String {
    cmdline(&args(v), CmdlineMode::Redacted).expect("a command line")
}

/// One case a line: the argv, its arguments joined by ` | `, then ` => ` and the command line
/// `redacted` must make of it.
const CASES: &[&str] = &[
    // URI passwords, any scheme.
    "app | postgresql://postgres:SECRET@127.0.0.1:5432/app => app postgresql://postgres:<redacted>@127.0.0.1:5432/app",
    "app | postgres://u:SECRET@db => app postgres://u:<redacted>@db",
    "app | --url=mysql+pymysql://u:SECRET@db:3306/x?charset=utf8 => app --url=mysql+pymysql://u:<redacted>@db:3306/x?charset=utf8",
    "app | DATABASE_URL=redis://:SECRET@cache:6379/0 => app DATABASE_URL=redis://:<redacted>@cache:6379/0",
    // An unescaped `@` in the password: everything up to the last `@` of the authority.
    "app | postgresql://u:SEC@RET@db/app => app postgresql://u:<redacted>@db/app",
    // Several URIs and multi-host URIs.
    "app | amqp://a:SECRET@mq | postgresql://b:SECRET@h1:5432,h2:5432/db => app amqp://a:<redacted>@mq postgresql://b:<redacted>@h1:5432,h2:5432/db",
    "java | -Dspring.datasource.url=jdbc:postgresql://u:SECRET@db/app => java -Dspring.datasource.url=jdbc:postgresql://u:<redacted>@db/app",
    // URI query parameters (JDBC, libpq URIs).
    "java | jdbc:postgresql://db:5432/app?user=app&password=SECRET&ssl=true => java jdbc:postgresql://db:5432/app?user=app&password=<redacted>&ssl=true",
    "app | postgresql:///app?host=/run/pg&password=SECRET => app postgresql:///app?host=/run/pg&password=<redacted>",
    "app | jdbc:sqlserver://db;user=sa;password=SECRET;encrypt=true => app jdbc:sqlserver://db;user=sa;password=<redacted>;encrypt=true",
    // libpq conninfo, plain and quoted values, spaces around `=`.
    "app | host=127.0.0.1 user=postgres password=SECRET dbname=app => app host=127.0.0.1 user=postgres password=<redacted> dbname=app",
    "app | host=db password='SEC RET \\' x' dbname=app => app host=db password=<redacted> dbname=app",
    "app | password = SECRET host=db => app password = <redacted> host=db",
    "app | dbname=app password=\"SEC RET\" => app dbname=app password=<redacted>",
    // KEY=VALUE and -DKEY=VALUE arguments.
    "app | -Dspring.datasource.password=SECRET => app -Dspring.datasource.password=<redacted>",
    "env | PGPASSWORD=SECRET | psql | -h | db => env PGPASSWORD=<redacted> psql -h db",
    // A lone KEY=VALUE argument's value may hold spaces.
    "env | PGPASSWORD=SEC RET | app => env PGPASSWORD=<redacted> app",
    "sh | -c | PGPASSWORD=SECRET psql -h db => sh -c PGPASSWORD=<redacted>",
    "app | DB_PASSWD=SECRET | MYSQL_PWD=SECRET | aws_secret_access_key=SECRET => app DB_PASSWD=<redacted> MYSQL_PWD=<redacted> aws_secret_access_key=<redacted>",
    "app | GITHUB_TOKEN=SECRET | Stripe.ApiKey=SECRET | X_API_KEY=SECRET => app GITHUB_TOKEN=<redacted> Stripe.ApiKey=<redacted> X_API_KEY=<redacted>",
    "app | -DdbPassword=SECRET => app -DdbPassword=<redacted>",
    // Secret flags, `--flag VALUE` and `--flag=VALUE`.
    "app | --db-password | SECRET | --port | 5432 => app --db-password <redacted> --port 5432",
    "app | --db-password=SECRET | -v => app --db-password=<redacted> -v",
    "app | --password | SECRET => app --password <redacted>",
    "app | --password=SECRET => app --password=<redacted>",
    "app | --client-secret | SECRET | --auth-token=SECRET => app --client-secret <redacted> --auth-token=<redacted>",
    "app | --token | SECRET | --api-key | SECRET | --DB_PASSWORD=SECRET => app --token <redacted> --api-key <redacted> --DB_PASSWORD=<redacted>",
    // The value is a secret even when it looks like a flag.
    "app | --db-password | -SECRET => app --db-password <redacted>",
    // A secret flag given as another one's value: both values hidden.
    "app | --token | --db-password | SECRET | -v => app --token <redacted> <redacted> -v",
    "psql | -c | --db-password | SECRET => psql -c <sql> <redacted>",
    // SQL on psql command lines stays hidden, next to the redaction.
    "/usr/bin/psql | postgresql://postgres:SECRET@db/app | -c | select 'x' => /usr/bin/psql postgresql://postgres:<redacted>@db/app -c <sql>",
    // Look-alikes that must stay as they are.
    "curl | http://example.com:8080/path?q=1 => curl http://example.com:8080/path?q=1",
    "app | postgresql://postgres@db:5432/app => app postgresql://postgres@db:5432/app",
    "app | postgresql://postgres:@db/app => app postgresql://postgres:@db/app",
    "git | clone | ssh://git@github.com:22/org/repo.git | git@host:x => git clone ssh://git@github.com:22/org/repo.git git@host:x",
    "app | http://host/a@b:c | mailto:a:b@c | ://x:y@z => app http://host/a@b:c mailto:a:b@c ://x:y@z",
    "app | --password-file | /run/secrets/db | --token-ttl | 5m => app --password-file /run/secrets/db --token-ttl 5m",
    "app | --secret-name=db | --no-password | -h | db => app --secret-name=db --no-password -h db",
    "psql | --password | -h | db | -U | app | app => psql --password -h db -U app app",
    "pg_dump | --password | app => pg_dump --password app",
    "env | PWD=/srv/app | OLDPWD=/ | USER=app | app => env PWD=/srv/app OLDPWD=/ USER=app app",
    "app | host=db user=app dbname=app sslmode=require => app host=db user=app dbname=app sslmode=require",
    "app | -Dspring.datasource.username=app | -Xmx512m | a=b=c => app -Dspring.datasource.username=app -Xmx512m a=b=c",
    "app | mypassword | -- | token => app mypassword -- token",
    "app | password= | --token= => app password= --token=",
    "python3 | -c | print(1) => python3 -c print(1)",
];

#[test]
fn every_form_is_redacted_and_look_alikes_are_kept() {
    let mut failures = Vec::new();
    for case in CASES {
        let (argv, want) = case.split_once(" => ").expect("a case has ` => `");
        let argv: Vec<&str> = argv.split(" | ").collect();
        let got = redacted(&argv);
        if got != want {
            failures.push(format!("{argv:?}\n   got  {got}\n   want {want}"));
        }
        if got.contains("SECRET") || got.contains("SEC RET") || got.contains("RET@") {
            failures.push(format!("{argv:?}: a secret is left in {got}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn full_keeps_credentials_but_never_sql_and_off_emits_nothing() {
    let argv = args(&["psql", "postgresql://u:SECRET@db/app", "-c", "select 1"]);
    assert_eq!(
        cmdline(&argv, CmdlineMode::Full).as_deref(),
        Some("psql postgresql://u:SECRET@db/app -c <sql>")
    );
    assert_eq!(cmdline(&argv, CmdlineMode::Off), None);
    assert_eq!(cmdline(&[], CmdlineMode::Redacted), None);
    assert_eq!(CmdlineMode::default(), CmdlineMode::Redacted);
}

#[test]
fn modes_parse_by_name() {
    assert_eq!(CmdlineMode::parse("full"), Ok(CmdlineMode::Full));
    assert_eq!(CmdlineMode::parse("redacted"), Ok(CmdlineMode::Redacted));
    assert_eq!(CmdlineMode::parse("off"), Ok(CmdlineMode::Off));
    assert!(CmdlineMode::parse("none").is_err());
    assert!(CmdlineMode::parse("").is_err());
}

#[test]
fn sql_on_a_psql_command_line_is_hidden() {
    assert_eq!(
        redact_sql(&args(&[
            "/usr/bin/psql",
            "-h",
            "db",
            "-c",
            "select secret",
            "-X"
        ])),
        args(&["/usr/bin/psql", "-h", "db", "-c", "<sql>", "-X"])
    );
    assert_eq!(
        redact_sql(&args(&["psql", "--command=select 1"])),
        args(&["psql", "--command=<sql>"])
    );
    assert_eq!(
        redact_sql(&args(&["psql", "-cselect 1"])),
        args(&["psql", "-c<sql>"])
    );
    assert_eq!(
        redact_sql(&args(&["python3", "-c", "print(1)"])),
        args(&["python3", "-c", "print(1)"])
    );
}

#[test]
fn odd_bytes_never_panic() {
    // Multi-byte characters next to every delimiter the scanners look at.
    for arg in [
        "é://ü:ß@ö",
        "x://é:ü@",
        "password=é",
        "é password='ü",
        "?password=ß&",
        ";token=\u{1F600};",
        "-D",
        "-Dé=ü",
        "://",
        "a://:@",
        "password='\\",
        "=",
        " = ",
    ] {
        let _ = redacted(&["app", arg]);
        let _ = redacted(&["app", "--db-password", arg]);
    }
}

/// Whatever junk comes before them, the forms appended after it are redacted: a tiny
/// deterministic fuzzer over prefixes made of the tokens the rules react to.
#[test]
fn junk_before_a_secret_never_lets_it_through() {
    const TOKENS: &[&str] = &[
        "psql",
        "-c",
        "--command",
        "--password",
        "--no-password",
        "--token",
        "--db-password",
        "--db-password=",
        "-D",
        "-Dx=",
        "password=",
        "'",
        "\"",
        "\\",
        "=",
        "x=y z",
        "?",
        "&",
        ";",
        "://",
        "a://b:",
        "@",
        "PWD=",
        "--",
        "--password-file",
        "é",
    ];
    const MARK: &str = "Zq9Mark";
    let forms: Vec<Vec<String>> = vec![
        vec!["--db-password".into(), MARK.into()],
        vec![format!("--db-password={MARK}")],
        vec![format!("PGPASSWORD={MARK}")],
        vec![format!("-Dapp.secret={MARK}")],
        vec![format!("postgresql://u:{MARK}@h/db")],
        vec![format!("host=h password={MARK} dbname=d")],
        vec![format!("jdbc:postgresql://h/db?user=u&password={MARK}")],
    ];
    // Every prefix of up to three tokens (a linear congruential walk keeps it small).
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..20_000 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let len = (seed >> 60) as usize % 4;
        let mut argv: Vec<String> = vec!["app".into()];
        for k in 0..len {
            let pick = (seed >> (8 * k + 8)) as usize % TOKENS.len();
            argv.push(TOKENS[pick].to_owned());
        }
        if (seed >> 40) & 1 == 1 {
            argv[0] = "psql".into();
        }
        for form in &forms {
            let mut all = argv.clone();
            all.extend(form.iter().cloned());
            let shown = cmdline(&all, CmdlineMode::Redacted).expect("a command line");
            assert!(!shown.contains(MARK), "{all:?} -> {shown}");
        }
    }
}
