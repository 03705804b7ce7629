// Placeholder until the app lands: shows whether this browser has a session.
const main = document.getElementById('app');
const response = await fetch('/v1/web/session');
main.textContent = response.ok
  ? 'Logged in to Kith.'
  : 'Run `kith open` in a terminal to open Kith here.';
