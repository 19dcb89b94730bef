//! Exact-match verifier for the built-in task: the response must be exactly the answer,
//! then EOS. Trailing text or a missing EOS scores 0, which teaches the policy to stop.
use super::Verdict;

/// `text` is the decoded response without special tokens; `ended_with_eos` says whether the
/// response was terminated by EOS rather than by the token limit.
pub fn exact_answer(text: &str, ended_with_eos: bool, answer: &str) -> Verdict {
    let (score, reason) = if text != answer {
        (0.0, format!("mismatch: {text:?} vs expected {answer:?}"))
    } else if !ended_with_eos {
        (
            0.0,
            format!("correct digits {answer:?} but no EOS before the token limit"),
        )
    } else {
        (1.0, format!("correct: {answer}"))
    };
    Verdict {
        score,
        reason,
        extracted: Some(text.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truth_table() {
        assert_eq!(exact_answer("85", true, "85").score, 1.0);
        assert_eq!(exact_answer("85", false, "85").score, 0.0);
        assert_eq!(exact_answer("851", true, "85").score, 0.0);
        assert_eq!(exact_answer("", true, "85").score, 0.0);
        assert!(exact_answer("84", true, "85").reason.contains("mismatch"));
    }
}
