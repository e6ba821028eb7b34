//! The bundled scenarios lint clean and their examples behave; `vigil lint` and `vigil serve`
//! report a broken directory with `file:line:col`.

use std::process::Command;

use crate::support::{bundled_scenarios, fixture_scenarios};
use vigil::scenario::load_dir;

#[test]
fn every_bundled_scenario_lints_clean_and_its_examples_behave() {
    let library = load_dir(&bundled_scenarios()).unwrap_or_else(|report| panic!("{report}"));
    assert!(!library.report.has_errors());
    assert_eq!(
        library.report.warnings(),
        0,
        "the bundled library has no warnings:\n{}",
        library.report
    );
    for id in [
        "passive-ideation-student",
        "imminent-pills-at-hand",
        "benign-idiom-control",
    ] {
        assert!(library.get(id).is_some(), "missing bundled scenario {id}");
    }
    // load_dir already ran every example through its check; prove the checks are live by
    // running them again here and counting.
    let mut checked = 0;
    for scenario in library.scenarios.values() {
        for criterion in scenario
            .criteria
            .iter()
            .filter(|c| c.has_patterns() && c.check.resources.is_none())
        {
            for example in &criterion.examples.present {
                assert!(
                    criterion.check.find(example).is_some(),
                    "{}: {example}",
                    criterion.id
                );
                checked += 1;
            }
            for example in &criterion.examples.absent {
                assert!(
                    criterion.check.find(example).is_none(),
                    "{}: {example}",
                    criterion.id
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 20, "only {checked} examples");
}

fn broken_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("criteria")).unwrap();
    std::fs::write(
        dir.path().join("broken.toml"),
        "id = \"broken\"\ntitle = \"x\"\nversion = 1\nrisk = \"moderate\"\nlocale = \"en-US\"\n\
         content_warning = \"x\"\n\n[persona]\nname = \"x\"\nsummary = \"y\"\n\n[[criteria]]\n\
         id = \"c\"\ntext = \"t\"\nkind = \"must\"\nseverity = \"minor\"\ncheck.patterns = ['(oops']\n",
    )
    .unwrap();
    dir
}

#[test]
fn lint_reports_file_line_col_and_fails() {
    let dir = broken_dir();
    let output = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .arg("lint")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    let expected = format!(
        "{}:17:19: error: invalid regex",
        dir.path().join("broken.toml").display()
    );
    assert!(stdout.contains(&expected), "{stdout}");

    let output = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .arg("lint")
        .arg(fixture_scenarios())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("2 scenarios"), "{stdout}");
}

#[test]
fn serve_refuses_a_broken_scenario_directory_with_the_same_report() {
    let dir = broken_dir();
    let data = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["serve", "--bind", "127.0.0.1:0", "--scenarios"])
        .arg(dir.path())
        .arg("--database-url")
        .arg(format!("sqlite://{}", data.path().join("v.db").display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("broken.toml:17:19: error: invalid regex"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was started"), "{stderr}");
}

#[test]
fn config_prints_the_effective_configuration_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vigil.toml");
    std::fs::write(
        &config,
        "[[targets]]\nname = \"gpt\"\nkind = \"openai\"\nbase_url = \"https://api.example.com/v1\"\nmodel = \"m\"\napi_key_env = \"VIGIL_TEST_KEY\"\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .arg("--config")
        .arg(&config)
        .arg("config")
        .env("VIGIL_TEST_KEY", "sk-very-secret")
        .env("VIGIL_DATABASE_URL", "postgres://vigil:hunter2@db/vigil")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("postgres://vigil:****@db/vigil"),
        "{stdout}"
    );
    assert!(
        stdout.contains("$VIGIL_TEST_KEY is set (value hidden)"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("sk-very-secret") && !stdout.contains("hunter2"),
        "{stdout}"
    );
    assert!(
        stdout.contains("name = \"demo\""),
        "built-in demo listed: {stdout}"
    );
}

#[test]
fn the_example_configuration_is_valid() {
    let text = include_str!("../vigil.example.toml");
    let config = vigil::config::Config::from_toml(text, "vigil.example.toml").unwrap();
    config.validate().unwrap();
    // Its commented targets, uncommented, are valid too.
    let uncommented: String = text
        .lines()
        .map(|l| {
            if l.starts_with("# [[targets]]")
                || l.starts_with("# name")
                || l.starts_with("# kind")
                || l.starts_with("# base_url")
                || l.starts_with("# model")
            {
                &l[2..]
            } else {
                l
            }
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let config = vigil::config::Config::from_toml(&uncommented, "uncommented").unwrap();
    assert!(
        config.targets.iter().any(|t| t.name == "local-llama"),
        "{:?}",
        config.targets
    );
    vigil::target::Targets::from_config(&config.targets()).unwrap();
}
