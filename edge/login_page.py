"""The sign-in page: a plain form that shows the server's own message (a wrong key, a lockout
with its wait), keeps the typed name after a failure, and signs in with POST /login.

Gradio's login page shows one fixed text for a wrong key and nothing at all for any other
answer (a locked-out address saw a blank page); this one is served in its place."""

from __future__ import annotations

import html

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in · AI dashboard</title>
<style>
  :root { color-scheme: light dark; font-family: system-ui, sans-serif; }
  body { display: grid; place-items: center; min-height: 90vh; margin: 0 1rem; }
  form { width: min(22rem, 100%); display: grid; gap: .75rem; }
  h1 { font-size: 1.35rem; margin: 0; }
  label { display: grid; gap: .25rem; font-size: .95rem; }
  input { font-size: 1rem; padding: .5rem .6rem; border: 1px solid #8a8a99; border-radius: 6px; }
  button { font-size: 1rem; padding: .6rem; border: 0; border-radius: 6px; cursor: pointer;
           background: #4338ca; color: #fff; }
  button[disabled] { opacity: .6; cursor: wait; }
  .hint { margin: 0; font-size: .9rem; }
  #problem { margin: 0; padding: .5rem .75rem; border-radius: 6px; background: #fde8e8;
             color: #7f1d1d; border: 1px solid #f5b5b5; }
  #problem:empty { display: none; }
</style></head>
<body>
<form id="sign-in" method="post" action="login" novalidate>
  <h1>AI dashboard</h1>
  <p class="hint">__MESSAGE__</p>
  <label>User name
    <input name="username" id="username" autocomplete="username" required autofocus></label>
  <label>Access key
    <input name="password" id="password" type="password" autocomplete="current-password"
           required></label>
  <p id="problem" role="alert"></p>
  <button type="submit">Login</button>
</form>
<script>
const form = document.getElementById("sign-in");
const problem = document.getElementById("problem");
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = form.username.value.trim();
  const key = form.password.value.trim();
  if (!name) { problem.textContent = "Enter your user name."; form.username.focus(); return; }
  if (!key) { problem.textContent = "Enter your access key."; form.password.focus(); return; }
  const button = form.querySelector("button");
  button.disabled = true;
  problem.textContent = "";
  try {
    const answer = await fetch("login", {
      method: "POST", credentials: "same-origin",
      body: new URLSearchParams({username: name, password: key}),
    });
    if (answer.ok) { window.location.replace("./"); return; }
    let detail = "";
    try { detail = (await answer.json()).detail || ""; } catch (e) {}
    if (answer.status === 400 && /incorrect credentials/i.test(detail)) {
      detail = "Wrong user name or access key.";
    }
    problem.textContent = detail || `Sign-in failed (status ${answer.status}).`;
    form.password.value = "";
    form.password.focus();
  } catch (e) {
    problem.textContent = "The server could not be reached. Try again.";
  } finally {
    button.disabled = false;
  }
});
</script>
</body></html>
"""


def login_page(message: str) -> bytes:
    return PAGE.replace("__MESSAGE__", html.escape(message)).encode()
