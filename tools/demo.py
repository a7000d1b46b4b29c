"""The demo behind tools/run: a sample project tree (spec section 1.1), mounted, shown working.

Usage: demo.py DEMO_DIR [--once]
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

PROJECT = "project-1764300000000-3f2a9c1e"


def make_tree(backing: str) -> None:
    """Create the sample project once; later runs keep what the user changed."""
    root = os.path.join(backing, "public", "projects", PROJECT)
    if os.path.exists(root):
        return
    for sub in ("topics", "scripts", "assets/images", "assets/videos", "assets/audio", "assets/music", "logs"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)

    def put(rel: str, doc) -> None:
        with open(os.path.join(root, rel), "w") as f:
            json.dump(doc, f, indent=2)

    put("metadata.json", {"projectId": PROJECT, "createdAt": "2025-11-28T10:00:00Z", "version": "1.0",
                          "status": "scripted"})
    topics = [{"id": "topic-1", "title": "Why octopuses are smart", "score": 0.91},
              {"id": "topic-2", "title": "The loudest sound ever recorded", "score": 0.84}]
    put("topics/discovered.json", {"version": "1.0", "topics": topics})
    put("topics/selected.json", {"version": "1.0", "topics": topics[:1]})
    put("topics/refined.json", {"version": "1.0", "topics": [{**topics[0], "angle": "problem solving"}]})
    put("scripts/topic-1.json", {"version": "1.0", "topicId": "topic-1", "title": topics[0]["title"],
                                 "segments": [{"id": "seg-1", "text": "Octopuses have nine brains.", "duration": 4.2},
                                              {"id": "seg-2", "text": "Each arm can taste.", "duration": 3.1}]})
    put("scripts/tags.json", {"version": "1.0", "tags": ["octopus", "ocean", "science"]})
    image = b"\xff\xd8\xff\xe0" + os.urandom(2048)
    digest = hashlib.md5(image).hexdigest()
    with open(os.path.join(root, f"assets/images/{digest}.jpg"), "wb") as f:
        f.write(image)
    put(f"assets/images/{digest}.metadata.json", {"version": "1.0", "url": "https://example.invalid/octopus.jpg",
                                                  "tags": ["octopus"]})
    with open(os.path.join(root, "assets/audio/seg-1.mp3"), "wb") as f:
        f.write(b"ID3" + os.urandom(1024))
    put("assets/audio/seg-1.timestamps.json",
        {"version": "1.0", "words": [{"word": "Octopuses", "start": 0.0, "end": 0.6}]})
    put("timeline.json", {"version": "1.0", "tracks": [{"type": "video", "clips": []}]})
    for log in ("errors.log", "warnings.log", "pipeline.log"):
        open(os.path.join(root, "logs", log), "w").close()


def step(text: str) -> None:
    print(f"\n\033[1m$ {text}\033[0m" if sys.stdout.isatty() else f"\n$ {text}", flush=True)


def sh(cmd: str, cwd: str) -> None:
    step(cmd)
    subprocess.run(["bash", "-c", cmd], cwd=cwd)


def main() -> int:
    demo = os.path.abspath(sys.argv[1])
    once = "--once" in sys.argv or not sys.stdin.isatty()
    backing, mnt = os.path.join(demo, "backing"), os.path.join(demo, "mnt")
    os.makedirs(mnt, exist_ok=True)
    make_tree(backing)
    fusestore = [sys.executable, "-m", "fusestore"]
    if os.path.ismount(mnt):
        subprocess.run([*fusestore, "unmount", mnt])
    daemon = subprocess.Popen([*fusestore, "mount", "--foreground", backing, mnt])
    deadline = time.monotonic() + 30
    while not os.path.ismount(mnt):
        if daemon.poll() is not None or time.monotonic() > deadline:
            print("tools/run: the mount did not come up", file=sys.stderr)
            return 1
        time.sleep(0.05)
    project = f"public/projects/{PROJECT}"
    print(f"fusestore serves {backing}\n            on {mnt}")
    sh(f"ls {project}", mnt)
    sh(f"python3 -c \"import json, time; d=json.load(open('{project}/metadata.json')); d['status']='rendering'; "
       f"d['updatedAt']=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()); "
       f"json.dump(d, open('{project}/metadata.json','w'), indent=2)\"", mnt)
    sh(f"grep status {project}/metadata.json", mnt)
    step(f"echo '{{\"status\": broken' > {project}/metadata.json   # invalid JSON")
    try:
        with open(os.path.join(mnt, project, "metadata.json"), "w") as f:
            f.write('{"status": broken\n')
    except OSError as e:
        print(f"close() failed: {os.strerror(e.errno)}" if e.errno == errno.EBADMSG else e)
    sh(f"grep status {project}/metadata.json   # unchanged", mnt)
    sh(f"ls .backups/{project}/metadata.json && cat .backups/{project}/metadata.json/1 | grep status", mnt)
    sh(f"fusestore backups {project}/metadata.json", mnt)
    sh(f"fusestore diff {project}/metadata.json   # what the last commit changed", mnt)
    url = "https://images.example.com/octopus.jpg"
    sh(f"key=$(fusestore cache key {url}) && mkdir -p .cache/media/$key && "
       f"head -c 20000 /dev/urandom > .cache/media/$key/image.jpg && "
       f"echo '{{\"url\": \"{url}\", \"tags\": [\"octopus\"]}}' > .cache/media/$key/metadata.json && "
       f"ls -l .cache/media/$key", mnt)
    sh(f"fusestore cache get {url} && fusestore cache stats", mnt)
    sh("fusestore status", mnt)
    sh("fusestore events --no-follow   # what the daemon did, one line each", mnt)
    if once:
        subprocess.run([*fusestore, "unmount", mnt])
        daemon.wait(timeout=30)
        print("\nDemo done and unmounted (run tools/run from a terminal to keep it mounted).")
        return 0
    print(f"""
The demo tree stays mounted on {mnt} until you press Ctrl-C. Things to try in another shell:
  cd {mnt}/{project}
  sed -i 's/octopus/squid/' scripts/tags.json        # committed, old version kept as a backup
  echo '{{oops' > timeline.json                        # rejected: timeline.json is unchanged
  ls ../../../.backups/{project}/scripts/tags.json    # backup generations 1, 2, 3
  fusestore restore scripts/tags.json                # undo (fusestore is in .venv/bin)
  ls {mnt}/.cache/media; fusestore cache ls           # the media/TTS cache
  fusestore events                                   # follow commits and rejections as they come
  fusestore status""")
    try:
        daemon.wait()
    except KeyboardInterrupt:
        daemon.send_signal(signal.SIGINT)
        daemon.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
