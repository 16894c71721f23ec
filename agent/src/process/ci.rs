//! CI job context from a process's environment: which provider, job, pipeline, run,
//! repository, ref, commit and actor. Only allow-listed names are ever read. Pure.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashSet};

use crate::audit::record::Ci;

/// How one provider spells its job context. Each field lists candidate variables, first
/// present wins.
struct Provider {
    name: &'static str,
    /// Set (to anything non-empty) in every job of this provider.
    detect: &'static str,
    job: &'static [&'static str],
    job_name: &'static [&'static str],
    pipeline: &'static [&'static str],
    run: &'static [&'static str],
    repository: &'static [&'static str],
    git_ref: &'static [&'static str],
    commit: &'static [&'static str],
    actor: &'static [&'static str],
    url: &'static [&'static str],
}

const PROVIDERS: &[Provider] = &[
    Provider {
        name: "github_actions",
        detect: "GITHUB_ACTIONS",
        job: &["GITHUB_JOB"],
        job_name: &[],
        pipeline: &["GITHUB_WORKFLOW"],
        run: &["GITHUB_RUN_ID"],
        repository: &["GITHUB_REPOSITORY"],
        git_ref: &["GITHUB_REF"],
        commit: &["GITHUB_SHA"],
        actor: &["GITHUB_ACTOR"],
        url: &[],
    },
    Provider {
        name: "gitlab_ci",
        detect: "GITLAB_CI",
        job: &["CI_JOB_ID"],
        job_name: &["CI_JOB_NAME"],
        pipeline: &["CI_PIPELINE_ID"],
        run: &["CI_PIPELINE_IID"],
        repository: &["CI_PROJECT_PATH"],
        git_ref: &["CI_COMMIT_REF_NAME"],
        commit: &["CI_COMMIT_SHA"],
        actor: &["GITLAB_USER_LOGIN"],
        url: &["CI_JOB_URL"],
    },
    Provider {
        name: "jenkins",
        detect: "JENKINS_URL",
        job: &["JOB_NAME"],
        job_name: &["STAGE_NAME"],
        pipeline: &["BUILD_TAG"],
        run: &["BUILD_NUMBER"],
        repository: &["GIT_URL"],
        git_ref: &["GIT_BRANCH"],
        commit: &["GIT_COMMIT"],
        actor: &["BUILD_USER_ID"],
        url: &["BUILD_URL"],
    },
    Provider {
        name: "buildkite",
        detect: "BUILDKITE",
        job: &["BUILDKITE_JOB_ID"],
        job_name: &["BUILDKITE_LABEL"],
        pipeline: &["BUILDKITE_PIPELINE_SLUG"],
        run: &["BUILDKITE_BUILD_NUMBER"],
        repository: &["BUILDKITE_REPO"],
        git_ref: &["BUILDKITE_BRANCH"],
        commit: &["BUILDKITE_COMMIT"],
        actor: &["BUILDKITE_BUILD_CREATOR"],
        url: &["BUILDKITE_BUILD_URL"],
    },
    Provider {
        name: "circleci",
        detect: "CIRCLECI",
        job: &["CIRCLE_JOB"],
        job_name: &[],
        pipeline: &["CIRCLE_WORKFLOW_ID"],
        run: &["CIRCLE_BUILD_NUM"],
        repository: &["CIRCLE_REPOSITORY_URL"],
        git_ref: &["CIRCLE_BRANCH", "CIRCLE_TAG"],
        commit: &["CIRCLE_SHA1"],
        actor: &["CIRCLE_USERNAME"],
        url: &["CIRCLE_BUILD_URL"],
    },
    Provider {
        name: "azure_pipelines",
        detect: "TF_BUILD",
        job: &["SYSTEM_JOBID"],
        job_name: &["SYSTEM_JOBDISPLAYNAME", "AGENT_JOBNAME"],
        pipeline: &["BUILD_DEFINITIONNAME"],
        run: &["BUILD_BUILDID"],
        repository: &["BUILD_REPOSITORY_NAME"],
        git_ref: &["BUILD_SOURCEBRANCH"],
        commit: &["BUILD_SOURCEVERSION"],
        actor: &["BUILD_REQUESTEDFOR"],
        url: &[],
    },
];

impl Provider {
    fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        std::iter::once(self.detect).chain(
            [
                self.job,
                self.job_name,
                self.pipeline,
                self.run,
                self.repository,
                self.git_ref,
                self.commit,
                self.actor,
                self.url,
            ]
            .into_iter()
            .flatten()
            .copied(),
        )
    }
}

/// The built-in allowlist: every variable some provider's mapping reads.
pub fn default_allowlist() -> HashSet<String> {
    PROVIDERS
        .iter()
        .flat_map(|p| p.names())
        .map(str::to_owned)
        .collect()
}

/// The CI context in `env` (already reduced to the allowlist), if any.
pub fn detect(env: &BTreeMap<String, String>) -> Option<Ci> {
    if env.is_empty() {
        return None;
    }
    let first = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| env.get(*n).filter(|v| !v.is_empty()).cloned())
    };
    let provider = PROVIDERS
        .iter()
        .find(|p| env.get(p.detect).is_some_and(|v| !v.is_empty()));
    let mut ci = Ci::default();
    let mut used: HashSet<&str> = HashSet::new();
    if let Some(p) = provider {
        ci = Ci {
            provider: Some(p.name.to_owned()),
            job: first(p.job),
            job_name: first(p.job_name),
            pipeline: first(p.pipeline),
            run: first(p.run),
            repository: first(p.repository),
            git_ref: first(p.git_ref),
            commit: first(p.commit),
            actor: first(p.actor),
            url: first(p.url),
            vars: BTreeMap::new(),
        };
        used.extend(p.names());
    }
    // Names the operator added, and other providers' names, stay visible as they are.
    let known = default_allowlist();
    ci.vars = env
        .iter()
        .filter(|(k, _)| !used.contains(k.as_str()) && !known.contains(k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (ci.provider.is_some() || !ci.vars.is_empty()).then_some(ci)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn github_actions() {
        let ci = detect(&env(&[
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_JOB", "build"),
            ("GITHUB_RUN_ID", "42"),
            ("GITHUB_REPOSITORY", "acme/api"),
            ("GITHUB_REF", "refs/heads/main"),
            ("GITHUB_ACTOR", "octocat"),
            ("GITHUB_WORKFLOW", "CI"),
        ]))
        .unwrap();
        assert_eq!(ci.provider.as_deref(), Some("github_actions"));
        assert_eq!(ci.job.as_deref(), Some("build"));
        assert_eq!(ci.run.as_deref(), Some("42"));
        assert_eq!(ci.repository.as_deref(), Some("acme/api"));
        assert_eq!(ci.git_ref.as_deref(), Some("refs/heads/main"));
        assert_eq!(ci.actor.as_deref(), Some("octocat"));
        assert!(ci.vars.is_empty());
    }

    #[test]
    fn every_provider_is_detected() {
        for (detect_var, name) in [
            ("GITLAB_CI", "gitlab_ci"),
            ("JENKINS_URL", "jenkins"),
            ("BUILDKITE", "buildkite"),
            ("CIRCLECI", "circleci"),
            ("TF_BUILD", "azure_pipelines"),
        ] {
            let ci = detect(&env(&[(detect_var, "true")])).unwrap();
            assert_eq!(ci.provider.as_deref(), Some(name));
        }
    }

    #[test]
    fn gitlab_fields() {
        let ci = detect(&env(&[
            ("GITLAB_CI", "true"),
            ("CI_JOB_ID", "901"),
            ("CI_JOB_NAME", "test"),
            ("CI_PIPELINE_ID", "77"),
            ("CI_PROJECT_PATH", "grp/proj"),
            ("CI_COMMIT_REF_NAME", "feature"),
            ("GITLAB_USER_LOGIN", "alice"),
        ]))
        .unwrap();
        assert_eq!(
            (
                ci.job.as_deref(),
                ci.job_name.as_deref(),
                ci.pipeline.as_deref()
            ),
            (Some("901"), Some("test"), Some("77"))
        );
        assert_eq!(ci.repository.as_deref(), Some("grp/proj"));
        assert_eq!(ci.actor.as_deref(), Some("alice"));
    }

    #[test]
    fn no_ci_no_context_and_extra_names_kept() {
        assert_eq!(detect(&env(&[])), None);
        assert_eq!(detect(&env(&[("GITHUB_ACTIONS", "")])), None);
        let ci = detect(&env(&[("BATCH_JOB_ID", "b-7")])).unwrap();
        assert_eq!(ci.provider, None);
        assert_eq!(ci.vars["BATCH_JOB_ID"], "b-7");
    }

    #[test]
    fn allowlist_covers_the_mappings() {
        let allow = default_allowlist();
        for name in [
            "GITHUB_RUN_ID",
            "CI_PROJECT_PATH",
            "BUILD_NUMBER",
            "CIRCLE_SHA1",
            "TF_BUILD",
        ] {
            assert!(allow.contains(name), "{name}");
        }
        assert!(!allow.contains("HOME"));
        assert!(!allow.contains("GITHUB_TOKEN"), "tokens are never read");
    }
}
