#!/usr/bin/perl
# A warmed Perl function with a worker thread, used as a mitosis seed.
#
# Start-up builds warm state (a word table of MD5 digests, a hash of 20,000 entries, a list of
# squares), starts a worker thread (Perl ithreads: an interpreter of its own on an OS thread)
# that sums slices of the list for the main thread through two Thread::Queues, answers one
# request internally and prints `ready`. Then every line on stdin gets one JSON line on
# stdout, "pid" last:
#
#   {"n": 5} -> {"n": 5, "word": ..., "digest": ..., "value": ..., "slice": ...,
#                "threads": T, "pid": P}
#
# "slice" comes from the worker thread, so a child whose worker did not come along never
# answers. "threads" is the thread count of the process (/proc/self/task), "pid" the pid of
# the process answering (read from /proc/self). A SIGUSR1 writes the line `usr1`. EOF on
# stdin: exit 0.
#
#   --once   answer one request (the first line) and exit 0: the cold start baseline and
#            the reference answer.

use strict;
use warnings;
use threads;
use Thread::Queue;
use Digest::MD5 qw(md5_hex);
use JSON::PP;

my $once = grep { $_ eq '--once' } @ARGV;
if (grep { $_ ne '--once' } @ARGV) {
    print STDERR "usage: fn.pl [--once]\n";
    exit 2;
}

my @words = map { substr(md5_hex("word-$_"), 0, 4 + $_ % 9) } 0 .. 511;
my %table = map { ("k$_" => ($_ * 7919) % 10007) } 0 .. 19_999;
my @squares = map { ($_ * $_) % 9973 } 0 .. 4095;

my $asks = Thread::Queue->new;
my $answers = Thread::Queue->new;
# The worker sums a slice of the squares (its own copy, made when it started).
threads->create(sub {
    while (defined(my $n = $asks->dequeue)) {
        my $from = $n % 4096;
        my $to = $from + 63 > 4095 ? 4095 : $from + 63;
        my $sum = 0;
        $sum += $squares[$_] for $from .. $to;
        $answers->enqueue($sum);
    }
})->detach;

my $json = JSON::PP->new->canonical;

sub live_pid { return 0 + readlink('/proc/self') }

sub thread_count {
    opendir(my $dir, '/proc/self/task') or return 0;
    my $count = grep { !/^\./ } readdir($dir);
    closedir($dir);
    return $count;
}

sub answer {
    my ($line) = @_;
    my $request = eval { $json->decode($line) };
    my $n = ref $request eq 'HASH' ? $request->{n} : undef;
    return { error => 'n must be an integer' } unless defined $n && $n =~ /^-?\d+$/;
    my $word = $words[abs($n) % @words];
    my $value = 0;
    $value += $table{'k' . ((abs($n) + $_ * 37) % 20_000)} for 0 .. 99;
    $asks->enqueue(abs($n));
    my $slice = $answers->dequeue;
    return {
        n => 0 + $n,
        word => $word,
        digest => md5_hex("$word:$n:$value"),
        value => $value,
        slice => $slice,
    };
}

sub reply {
    my ($line) = @_;
    my $out = answer($line);
    $out->{threads} = thread_count();
    # "pid" last: the JSON is canonical (keys sorted), so it is written by hand after it.
    my $text = $json->encode($out);
    $text =~ s/}$/,"pid":@{[live_pid()]}}/;
    syswrite(STDOUT, "$text\n");
}

if (!$once) {
    $SIG{USR1} = sub { syswrite(STDOUT, "usr1\n") };
    answer('{"n": 0}');
    syswrite(STDOUT, "ready\n");
}
while (my $line = <STDIN>) {
    next if $line =~ /^\s*$/;
    reply($line);
    last if $once;
}
exit 0;
